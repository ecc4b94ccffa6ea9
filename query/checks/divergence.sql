-- name: divergence
-- severity: error
-- description: a loss spikes far above its running minimum (the first point where mean > factor x best so far)
-- param factor = 3.0 : a point diverges when its mean exceeds factor x the lowest earlier point mean
-- param metrics = 'loss' : regular expression selecting the metric names to watch
-- param min_points = 2 : earlier points needed before a spike counts
WITH s AS (
    SELECT name, point, epoch, mean, first_step,
           min(mean) OVER w AS best_before,
           count(*) OVER w AS points_before
    FROM metric_points
    WHERE regexp_matches(name, $metrics) AND point IS NOT NULL AND mean IS NOT NULL
    WINDOW w AS (PARTITION BY name ORDER BY point ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
)
SELECT name AS metric, epoch, point, first_step AS step, mean AS value, best_before AS running_min,
       round(mean / nullif(best_before, 0), 2) AS ratio
FROM s
WHERE points_before >= $min_points
  AND mean > best_before + ($factor - 1) * greatest(abs(best_before), 1e-12)
QUALIFY row_number() OVER (PARTITION BY name ORDER BY point) = 1
ORDER BY name

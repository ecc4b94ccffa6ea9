-- name: divergence
-- severity: error
-- description: a loss spikes far above its running minimum (the first point where mean > factor x best so far)
-- needs: metric named like $metrics | SELECT count(*) FROM metric_points WHERE regexp_matches(name, $metrics)
-- param factor = 3.0 : a point diverges when its mean exceeds factor x the lowest earlier point mean
-- param metrics = 'loss' : regular expression selecting the metric names to watch
-- param min_points = 2 : earlier points needed before a spike counts
WITH s AS (
    SELECT name, point, epoch, mean, first_step, last_step,
           min(mean) OVER w AS best_before,
           count(*) OVER w AS points_before
    FROM metric_points
    WHERE regexp_matches(name, $metrics) AND point IS NOT NULL AND mean IS NOT NULL
    WINDOW w AS (PARTITION BY name ORDER BY point ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
), hit AS (
    SELECT *, best_before + ($factor - 1) * greatest(abs(best_before), 1e-12) AS limit_value
    FROM s
    WHERE points_before >= $min_points
      AND mean > best_before + ($factor - 1) * greatest(abs(best_before), 1e-12)
    QUALIFY row_number() OVER (PARTITION BY name ORDER BY point) = 1
)
-- the exact step: the first value of the diverging point above the limit (or not finite)
SELECT h.name AS metric, h.epoch, h.point,
       coalesce(min(m.step) FILTER (WHERE m.value > h.limit_value OR NOT isfinite(m.value)), h.first_step) AS step,
       h.mean AS value, h.best_before AS running_min, round(h.mean / nullif(h.best_before, 0), 2) AS ratio
FROM hit h LEFT JOIN metrics m
  ON m.run_id = ANY($run_ids) AND m.name = h.name AND m.step BETWEEN h.first_step AND h.last_step
GROUP BY h.name, h.epoch, h.point, h.first_step, h.mean, h.best_before
ORDER BY metric

-- name: plateau
-- severity: warn
-- description: a loss has not improved for `patience` points (epochs when the run has epochs)
-- needs: metric named like $metrics | SELECT count(*) FROM metric_points WHERE regexp_matches(name, $metrics)
-- param patience = 5 : points without a new best before the metric counts as stalled
-- param min_delta = 0.001 : an improvement must beat the best so far by this fraction
-- param metrics = 'loss' : regular expression selecting the (lower-is-better) metric names
WITH s AS (
    SELECT name, point, epoch, mean,
           min(mean) OVER (PARTITION BY name ORDER BY point
                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS best_before
    FROM metric_points
    WHERE regexp_matches(name, $metrics) AND point IS NOT NULL AND mean IS NOT NULL
), imp AS (
    SELECT *, (best_before IS NULL OR mean < best_before - $min_delta * abs(best_before)) AS improved
    FROM s
), per AS (
    SELECT name, max(point) FILTER (WHERE improved) AS last_improved, max(point) AS last_point,
           count(*) AS points
    FROM imp GROUP BY name
)
SELECT p.name AS metric, i.epoch AS best_epoch, i.mean AS best_value, p.points,
       p.last_point - p.last_improved AS points_without_improvement
FROM per p JOIN imp i ON i.name = p.name AND i.point = p.last_improved
WHERE p.last_point - p.last_improved >= $patience
ORDER BY metric

-- name: loss_not_decreasing
-- severity: warn
-- description: training rule: a loss is not lower at the end of the run than at its start (mean of the last window of points vs the first)
-- needs: training metric named like $metrics | SELECT count(*) FROM metric_points WHERE regexp_matches(name, $metrics) AND NOT regexp_matches(name, '^(val|valid|validation|eval|test)[_/.]')
-- param window = 0.2 : fraction of the points (at least one) averaged at each end
-- param min_decrease = 0.01 : the end must be below the start by this fraction
-- param min_points = 4 : points needed before the rule applies
-- param metrics = 'loss' : regular expression selecting the metric names (validation metrics are skipped)
WITH s AS (
    SELECT name, mean,
           row_number() OVER (PARTITION BY name ORDER BY point) AS k,
           count(*) OVER (PARTITION BY name) AS points
    FROM metric_points
    WHERE regexp_matches(name, $metrics) AND NOT regexp_matches(name, '^(val|valid|validation|eval|test)[_/.]')
      AND point IS NOT NULL AND mean IS NOT NULL
), e AS (
    SELECT name, any_value(points) AS points, greatest(1, CAST(floor(any_value(points) * $window) AS BIGINT)) AS w
    FROM s GROUP BY name
)
SELECT s.name AS metric, e.points,
       avg(s.mean) FILTER (WHERE s.k <= e.w) AS start_value,
       avg(s.mean) FILTER (WHERE s.k > e.points - e.w) AS end_value
FROM s JOIN e ON e.name = s.name
WHERE e.points >= $min_points
GROUP BY s.name, e.points
HAVING avg(s.mean) FILTER (WHERE s.k > e.points - e.w)
       > avg(s.mean) FILTER (WHERE s.k <= e.w) - $min_decrease * abs(avg(s.mean) FILTER (WHERE s.k <= e.w))
ORDER BY metric

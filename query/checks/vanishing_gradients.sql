-- name: vanishing_gradients
-- severity: warn
-- description: training rule: a parameter's gradient norm (recorded by fl.watch as grad_norm/<param>) stayed below threshold over the last points
-- needs: grad_norm/<param> metrics (from fl.watch) | SELECT count(*) FROM metric_points WHERE starts_with(name, 'grad_norm/')
-- param threshold = 1e-7 : gradient L2 norm below which a gradient counts as vanished
-- param last = 3 : how many of the most recent points must all be below the threshold
WITH s AS (
    SELECT name, point, epoch, max, last_step,
           row_number() OVER (PARTITION BY name ORDER BY point DESC) AS back
    FROM metric_points
    WHERE starts_with(name, 'grad_norm/') AND point IS NOT NULL AND max IS NOT NULL
)
SELECT substr(name, 11) AS parameter, max(max) AS largest_recent_norm, count(*) AS points,
       min(epoch) AS from_epoch, max(last_step) AS until_step
FROM s WHERE back <= $last
GROUP BY name
HAVING max(max) < $threshold
ORDER BY parameter

-- name: update_ratio
-- severity: warn
-- description: training rule: the size of a parameter's updates relative to its weights (update_ratio/<param> from fl.watch, |w_t+1 - w_t| / |w_t|) is out of range over the last points
-- needs: update_ratio/<param> metrics (from fl.watch) | SELECT count(*) FROM metric_points WHERE starts_with(name, 'update_ratio/')
-- param low = 1e-6 : median ratio below this: the parameter barely learns
-- param high = 0.1 : median ratio above this: updates are too large (learning rate too high)
-- param last = 5 : most recent points considered
-- param exclude = '(^|[.])bias$' : regular expression of parameter names to skip (biases start near zero, so their ratios run large)
WITH s AS (
    SELECT name, point, epoch, mean,
           row_number() OVER (PARTITION BY name ORDER BY point DESC) AS back
    FROM metric_points
    WHERE starts_with(name, 'update_ratio/') AND NOT regexp_matches(substr(name, 14), $exclude)
      AND point IS NOT NULL AND mean IS NOT NULL
)
SELECT substr(name, 14) AS parameter, median(mean) AS median_ratio, count(*) AS points, max(epoch) AS last_epoch,
       CASE WHEN median(mean) > $high THEN 'too large' ELSE 'too small' END AS problem
FROM s WHERE back <= $last
GROUP BY name
HAVING median(mean) > $high OR median(mean) < $low
ORDER BY parameter

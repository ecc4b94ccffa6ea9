-- name: dead_relu
-- severity: warn
-- description: training rule: the fraction of a ReLU's units that output zero for every item of a batch (dead_relu/<module> from fl.watch) stayed above threshold over the last points
-- needs: dead_relu/<module> metrics (from fl.watch) | SELECT count(*) FROM metric_points WHERE starts_with(name, 'dead_relu/')
-- param threshold = 0.5 : fraction of dead units above which a layer is flagged
-- param last = 3 : most recent points considered (their mean must be above the threshold)
WITH s AS (
    SELECT name, point, epoch, mean,
           row_number() OVER (PARTITION BY name ORDER BY point DESC) AS back
    FROM metric_points
    WHERE starts_with(name, 'dead_relu/') AND point IS NOT NULL AND mean IS NOT NULL
)
SELECT substr(name, 11) AS module, round(avg(mean), 4) AS dead_fraction, count(*) AS points, max(epoch) AS last_epoch
FROM s WHERE back <= $last
GROUP BY name
HAVING avg(mean) > $threshold
ORDER BY dead_fraction DESC

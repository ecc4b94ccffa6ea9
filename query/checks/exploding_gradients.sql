-- name: exploding_gradients
-- severity: error
-- description: training rule: a parameter's gradient norm (grad_norm/<param> from fl.watch) is non-finite or above threshold
-- needs: grad_norm/<param> metrics (from fl.watch) | SELECT count(*) FROM metric_points WHERE starts_with(name, 'grad_norm/')
-- param threshold = 1000.0 : gradient L2 norm above which a gradient counts as exploding
SELECT substr(name, 11) AS parameter,
       max(max) AS largest_norm, CAST(sum(n_bad) AS BIGINT) AS nonfinite_values,
       min(epoch) FILTER (WHERE max > $threshold OR n_bad > 0) AS first_epoch,
       min(first_step) FILTER (WHERE max > $threshold OR n_bad > 0) AS first_step
FROM metric_points
WHERE starts_with(name, 'grad_norm/')
GROUP BY name
HAVING max(max) > $threshold OR sum(n_bad) > 0
ORDER BY largest_norm DESC

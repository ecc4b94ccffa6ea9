-- name: nonfinite
-- severity: error
-- description: metric values that are NaN or infinite (which metric, how many, first step and epoch)
-- needs: metrics in this run | SELECT count(*) FROM metric_points
-- Reads metric_points, the per-point summary of the run's metrics the health engine builds once.
SELECT name AS metric,
       CAST(sum(n_bad) AS BIGINT) AS nonfinite_values,
       CAST(sum(n) AS BIGINT) AS total_values,
       min(first_bad_step) AS first_step,
       min(epoch) FILTER (WHERE n_bad > 0) AS first_epoch
FROM metric_points
GROUP BY name
HAVING sum(n_bad) > 0
ORDER BY first_step

-- name: failed_steps
-- severity: error
-- description: step calls (spans) that ended in an error: which step, which call, what error
-- needs: step calls (@fl.step spans) in this run | SELECT count(*) FROM spans WHERE run_id = $run_id
-- param max_failures = 0 : failures a step may have before the check fails
SELECT name AS step, count(*) OVER (PARTITION BY name) AS failures, span_id, epoch, batch,
       start_time, error_type, error_message
FROM spans
WHERE run_id = $run_id AND status = 'error'
QUALIFY count(*) OVER (PARTITION BY name) > $max_failures
ORDER BY start_time

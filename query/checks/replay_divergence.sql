-- name: replay_divergence
-- severity: error
-- description: replays of this run whose re-executed values diverged from the record, or that failed
SELECT replay_id, segment, status, fidelity, compared, max_abs_diff, first_divergence, error
FROM replays
WHERE run_id = $run_id AND (fidelity = 'diverged' OR status = 'failed')
ORDER BY started_at

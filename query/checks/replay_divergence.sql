-- name: replay_divergence
-- severity: error
-- description: replays of this run whose values diverged (from the record, or new values from a full re-execution) or that failed, unless a newer replay of the same segment succeeded (remove one with flightlog rm <replay_id>)
-- needs: replays of this run | SELECT count(*) FROM replays WHERE run_id = $run_id
SELECT b.replay_id, b.segment, b.status, b.fidelity, b.compared, b.max_abs_diff, b.first_divergence, b.error
FROM replays b
WHERE b.run_id = $run_id AND (b.fidelity = 'diverged' OR b.status = 'failed')
  AND NOT EXISTS (SELECT 1 FROM replays g
                  WHERE g.run_id = b.run_id AND g.segment = b.segment AND g.started_at > b.started_at
                    AND g.status = 'ok' AND g.fidelity NOT IN ('diverged', 'failed'))
ORDER BY b.started_at

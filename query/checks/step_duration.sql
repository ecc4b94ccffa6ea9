-- name: step_duration
-- severity: warn
-- description: a step's p95 duration regressed against that step's history in earlier runs of the project
-- needs: step calls (@fl.step spans) in this run | SELECT count(*) FROM spans WHERE run_id = $run_id AND duration_ms IS NOT NULL
-- needs: earlier run of the project with the same steps to compare with | SELECT count(*) FROM spans s JOIN runs r ON r.run_id = s.run_id WHERE s.run_id <> $run_id AND r.project IS NOT DISTINCT FROM (SELECT project FROM runs WHERE run_id = $run_id) AND r.started_at < (SELECT started_at FROM runs WHERE run_id = $run_id) AND r.kind IS DISTINCT FROM 'replay' AND s.name IN (SELECT name FROM spans WHERE run_id = $run_id)
-- param factor = 1.5 : the run's p95 must exceed factor x the historical p95
-- param min_ms = 5.0 : and be at least this many milliseconds slower
-- param min_calls = 5 : calls needed on each side
WITH me AS (
    SELECT project, started_at FROM runs WHERE run_id = $run_id
), cur AS (
    SELECT name, count(*) AS calls, quantile_cont(duration_ms, 0.95) AS p95
    FROM spans WHERE run_id = $run_id AND duration_ms IS NOT NULL GROUP BY name
), hist AS (
    SELECT s.name, count(*) AS calls, count(DISTINCT s.run_id) AS runs,
           quantile_cont(s.duration_ms, 0.95) AS p95
    FROM spans s JOIN runs r ON r.run_id = s.run_id, me
    WHERE s.run_id <> $run_id AND r.project IS NOT DISTINCT FROM me.project
      AND r.started_at < me.started_at AND r.kind IS DISTINCT FROM 'replay'
      AND s.duration_ms IS NOT NULL AND s.name IN (SELECT name FROM cur)
    GROUP BY s.name
)
SELECT c.name AS step, c.calls, round(c.p95, 3) AS p95_ms, h.calls AS history_calls, h.runs AS history_runs,
       round(h.p95, 3) AS history_p95_ms, round(c.p95 / nullif(h.p95, 0), 2) AS ratio
FROM cur c JOIN hist h ON h.name = c.name
WHERE c.calls >= $min_calls AND h.calls >= $min_calls
  AND c.p95 > $factor * h.p95 AND c.p95 - h.p95 >= $min_ms
ORDER BY ratio DESC

-- name: drift
-- severity: warn
-- description: a step's inputs drifted from the reference run (PSI and KS over the io summaries' histograms and category frequencies)
-- needs: step inputs with summaries in this run | SELECT count(*) FROM io WHERE run_id = $run_id AND direction = 'input' AND summary IS NOT NULL
-- needs: reference run (an earlier finished run of the project that called the same step; or pass --reference) | SELECT count(*) FROM (SELECT DISTINCT step_name FROM io WHERE run_id = $run_id AND direction = 'input' AND summary IS NOT NULL) c WHERE $reference <> '' OR EXISTS (SELECT 1 FROM io i JOIN runs r ON r.run_id = i.run_id WHERE i.direction = 'input' AND i.run_id <> $run_id AND i.step_name = c.step_name AND r.status = 'finished' AND r.kind IS DISTINCT FROM 'replay' AND r.project IS NOT DISTINCT FROM (SELECT project FROM runs WHERE run_id = $run_id) AND r.started_at < (SELECT started_at FROM runs WHERE run_id = $run_id))
-- param psi = 0.2 : population stability index above which a column drifted
-- param ks = 0.2 : Kolmogorov-Smirnov distance (from histograms) above which a numeric column drifted
-- param max_calls = 50 : most recent calls per step and argument read from each run
-- post: drift
-- The SQL picks the summaries (this run's and the reference run's); a Python post-step merges the
-- histograms of the calls, rebins them onto the reference bins and computes PSI and KS.
WITH me AS (
    SELECT project, started_at FROM runs WHERE run_id = $run_id
), cur AS (
    SELECT step_name, arg, summary FROM io
    WHERE run_id = $run_id AND direction = 'input' AND summary IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY step_name, arg ORDER BY time DESC) <= $max_calls
), cand AS (
    SELECT DISTINCT i.step_name, i.run_id, r.started_at
    FROM io i JOIN runs r ON r.run_id = i.run_id, me
    WHERE i.direction = 'input' AND i.run_id <> $run_id AND i.step_name IN (SELECT step_name FROM cur)
      AND r.status = 'finished' AND r.kind IS DISTINCT FROM 'replay'
      AND r.project IS NOT DISTINCT FROM me.project AND r.started_at < me.started_at
), refs AS (
    SELECT step_name, $reference AS ref_run FROM (SELECT DISTINCT step_name FROM cur) WHERE $reference <> ''
    UNION ALL
    SELECT step_name, arg_max(run_id, started_at) FROM cand WHERE $reference = '' GROUP BY step_name
), ref AS (
    SELECT i.step_name, i.arg, i.summary, f.ref_run FROM io i JOIN refs f ON f.ref_run = i.run_id AND f.step_name = i.step_name
    WHERE i.direction = 'input' AND i.summary IS NOT NULL
    QUALIFY row_number() OVER (PARTITION BY i.step_name, i.arg ORDER BY i.time DESC) <= $max_calls
)
SELECT c.step_name AS step, c.arg, f.ref_run AS reference_run, 'current' AS side, c.summary
FROM cur c JOIN refs f ON f.step_name = c.step_name
UNION ALL
SELECT step_name, arg, ref_run, 'reference', summary FROM ref

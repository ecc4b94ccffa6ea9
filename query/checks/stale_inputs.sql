-- name: stale_inputs
-- severity: warn
-- description: step inputs that were stale (produced more than max_age_days before use) or superseded (the producing step had already written a newer version when the input was used)
-- needs: step inputs with fingerprints in this run | SELECT count(*) FROM io WHERE run_id = $run_id AND direction = 'input' AND fingerprint IS NOT NULL
-- param max_age_days = 30 : an input produced longer ago than this (before its use) is stale
-- Lineage: an input's producer is the step call whose output has the same fingerprint (latest such
-- output written before the use). Versions of a producer's output are its distinct fingerprints,
-- dated by first appearance.
WITH inp AS (
    SELECT step_name, arg, fingerprint, min(time) AS used_at, arg_min(span_id, time) AS span_id
    FROM io
    WHERE run_id = $run_id AND direction = 'input' AND fingerprint IS NOT NULL
    GROUP BY step_name, arg, fingerprint
), prod AS (
    SELECT i.step_name, i.arg, i.fingerprint, i.used_at, i.span_id,
           o.step_name AS producer, o.arg AS out_arg, max(o.time) AS produced_at
    FROM inp i JOIN io o ON o.fingerprint = i.fingerprint AND o.direction = 'output' AND o.time <= i.used_at
    GROUP BY ALL
), versions AS (
    SELECT step_name, arg, fingerprint, min(time) AS first_at
    FROM io WHERE direction = 'output' AND fingerprint IS NOT NULL
      AND step_name IN (SELECT producer FROM prod)
    GROUP BY ALL
), judged AS (
    SELECT p.*, v.fingerprint AS newer_fingerprint, v.first_at AS newer_at
    FROM prod p ASOF LEFT JOIN versions v
      ON v.step_name = p.producer AND v.arg = p.out_arg AND v.first_at > p.produced_at
)
SELECT step_name AS step, arg, fingerprint, span_id, producer, produced_at, used_at,
       CASE WHEN newer_at IS NOT NULL AND newer_at <= used_at THEN 'superseded' ELSE 'stale' END AS problem,
       CASE WHEN newer_at <= used_at THEN newer_fingerprint END AS newer_fingerprint,
       CASE WHEN newer_at <= used_at THEN newer_at END AS newer_at,
       round((epoch(used_at) - epoch(produced_at)) / 86400.0, 2) AS age_days
FROM judged
WHERE (newer_at IS NOT NULL AND newer_at <= used_at)
   OR epoch(used_at) - epoch(produced_at) > $max_age_days * 86400.0
ORDER BY used_at

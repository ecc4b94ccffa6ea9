-- name: lost_records
-- severity: error
-- description: checkpoint writes that failed, and rows the recorder had to drop (the record is incomplete)
-- param counters = 'encode_error|step_record_failed|collector_(rejected|unconfirmed)|checkpoint.*(fail|error)' : regular expression of the run's problem counters that also count as lost records (rows the collector refused or did not confirm are set aside in the spool, not stored)
WITH r AS (SELECT dropped_rows, counters FROM runs WHERE run_id = $run_id)
SELECT 'checkpoint write failed' AS problem, loop || '[' || iteration || ']' AS location,
       CAST(1 AS BIGINT) AS count, error AS detail
FROM checkpoints WHERE run_id = $run_id AND status = 'failed'
UNION ALL
SELECT 'dropped rows', NULL, dropped_rows, 'rows could not be written (backlog full or write errors)'
FROM r WHERE dropped_rows > 0
UNION ALL
SELECT 'problem counter', k, CAST(counters::JSON->>k AS BIGINT), 'counted by the recorder'
FROM r, unnest(json_keys(counters::JSON)) AS t(k)
WHERE json_valid(counters) AND regexp_matches(k, $counters)

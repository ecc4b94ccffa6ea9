-- name: no_bias_introduced
-- severity: error
-- description: an operation recorded by fl.inspect (a filter, dropna, query, join, or a call that dropped rows) cut a sensitive group's share of the rows by more than the threshold (MLINSPECT's NoBiasIntroducedFor)
-- needs: operations recorded by fl.inspect(sensitive=...) with counts of a sensitive column | SELECT count(*) FROM spans WHERE run_id = $run_id AND json_extract_string(attributes, '$."flightlog.inspect.groups"') IS NOT NULL
-- param min_relative_change = -0.3 : lowest allowed (share after - share before) / share before of a group
-- param min_rows = 1 : groups with fewer rows than this before the operation are not judged
-- Reads the spans fl.inspect writes: attribute flightlog.inspect.groups holds, per sensitive column
-- and value, the rows before (summed over the inputs that have the column) and after the call.
-- Shares are over all rows of the column, nulls included; the null group itself is not judged.
-- A run without fl.inspect data is skipped (the needs: line).
WITH ops AS (
    SELECT span_id, start_time,
           json_extract_string(attributes, '$."flightlog.inspect.op"') AS op,
           json_extract_string(attributes, '$."flightlog.inspect.kind"') AS kind,
           json_extract_string(attributes, '$."code.file.path"') AS file,
           TRY_CAST(json_extract_string(attributes, '$."code.line.number"') AS BIGINT) AS line,
           json_extract_string(attributes, '$."flightlog.inspect.code"') AS code,
           TRY_CAST(json_extract_string(attributes, '$."flightlog.inspect.rows_in"') AS BIGINT) AS rows_in,
           TRY_CAST(json_extract_string(attributes, '$."flightlog.inspect.rows_out"') AS BIGINT) AS rows_out,
           json_extract_string(attributes, '$."flightlog.inspect.groups"') AS groups
    FROM spans
    WHERE run_id = $run_id AND status = 'ok'
      AND json_extract_string(attributes, '$."flightlog.inspect.groups"') IS NOT NULL
), judged_ops AS (
    SELECT * FROM ops
    WHERE kind IN ('filter', 'join') OR (kind = 'opaque' AND rows_out < rows_in)
), g AS (
    SELECT span_id, start_time, op, kind, file, line, code,
           unnest(from_json(groups, '[{"column":"VARCHAR","value":"VARCHAR","before":"BIGINT","after":"BIGINT","before_total":"BIGINT","after_total":"BIGINT"}]'), recursive := true)
    FROM judged_ops
), shares AS (
    SELECT *, before / before_total AS share_before, after / after_total AS share_after
    FROM g
    WHERE value IS NOT NULL AND before IS NOT NULL AND after IS NOT NULL
      AND before_total > 0 AND after_total > 0 AND before >= greatest($min_rows, 1)
)
SELECT op, kind, file, line, code, "column", value AS "group", before AS rows_before, after AS rows_after,
       round(share_before, 4) AS share_before, round(share_after, 4) AS share_after,
       round((share_after - share_before) / share_before, 4) AS relative_change, span_id
FROM shares
WHERE (share_after - share_before) / share_before < $min_relative_change
ORDER BY start_time, "column", relative_change

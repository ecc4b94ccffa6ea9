-- name: similar_removal_probabilities
-- severity: warn
-- description: an operation recorded by fl.inspect (a filter, dropna, query, join, or a call that dropped rows) removed the rows of one sensitive group with a much higher probability than those of another (MLINSPECT's SimilarRemovalProbabilitiesFor)
-- needs: operations recorded by fl.inspect(sensitive=...) with counts of a sensitive column | SELECT count(*) FROM spans WHERE run_id = $run_id AND json_extract_string(attributes, '$."flightlog.inspect.groups"') IS NOT NULL
-- param max_ratio = 2.0 : highest allowed removal probability of a group over the lowest one of the same column and operation
-- param min_difference = 0.05 : and the two probabilities must differ by at least this much
-- param min_rows = 1 : groups with fewer rows than this before the operation are not judged
-- Removal probability of a group = (rows before - rows after) / rows before (0 when a join
-- duplicated its rows). Unlike MLINSPECT, whose reference is the lowest *non-zero* probability (so a
-- filter that removes rows of one group only passes), the reference here is the lowest probability,
-- zero included; min_difference keeps chance differences of a light filter out. The null group is
-- not judged. A run without fl.inspect data is skipped (the needs: line).
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
), p AS (
    SELECT *, greatest(before - after, 0) AS removed, greatest(before - after, 0) / before AS removal_probability
    FROM g
    WHERE value IS NOT NULL AND before IS NOT NULL AND after IS NOT NULL AND before > 0
      AND before >= greatest($min_rows, 1)
), ref AS (
    SELECT span_id, "column", min(removal_probability) AS lowest,
           arg_min(value, removal_probability) AS lowest_group
    FROM p GROUP BY span_id, "column"
)
SELECT p.op, p.kind, p.file, p.line, p.code, p."column", p.value AS "group", p.before AS rows_before,
       p.after AS rows_after, p.removed, round(p.removal_probability, 4) AS removal_probability,
       r.lowest_group, round(r.lowest, 4) AS lowest_removal_probability,
       CASE WHEN r.lowest > 0 THEN round(p.removal_probability / r.lowest, 3) END AS ratio, p.span_id
FROM p JOIN ref r ON r.span_id = p.span_id AND r."column" = p."column"
WHERE p.removal_probability > $max_ratio * r.lowest
  AND p.removal_probability - r.lowest >= $min_difference
ORDER BY p.start_time, p."column", p.removal_probability DESC

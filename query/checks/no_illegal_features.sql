-- name: no_illegal_features
-- severity: error
-- description: a model was fitted (fit / fit_transform / fit_predict recorded by fl.inspect) on a feature named as illegal: race, gender, age by default, or what fl.inspect(illegal=...) set (MLINSPECT's NoIllegalFeatures)
-- needs: model fits recorded by fl.inspect with known feature names | SELECT count(*) FROM spans WHERE run_id = $run_id AND json_extract_string(attributes, '$."flightlog.inspect.model"') = 'true' AND json_extract_string(attributes, '$."flightlog.inspect.features"') IS NOT NULL
-- param extra = '' : more illegal names, comma-separated, checked on top of the ones the run recorded
-- A feature matches a name when it is the name, starts with "<name>_" (one-hot columns such as
-- race_White), or has a scikit-learn prefix ("cat__race", "cat__race_White"); case-insensitive.
-- Features are the names the model part was fitted on (a Pipeline's steps before the model, else the
-- columns of X). A run without fl.inspect data is skipped (the needs: line).
WITH fits AS (
    SELECT span_id, start_time,
           json_extract_string(attributes, '$."flightlog.inspect.op"') AS op,
           json_extract_string(attributes, '$."flightlog.inspect.estimator"') AS estimator,
           json_extract_string(attributes, '$."code.file.path"') AS file,
           TRY_CAST(json_extract_string(attributes, '$."code.line.number"') AS BIGINT) AS line,
           json_extract_string(attributes, '$."flightlog.inspect.code"') AS code,
           from_json(json_extract_string(attributes, '$."flightlog.inspect.features"'), '["VARCHAR"]') AS features,
           coalesce(from_json(json_extract_string(attributes, '$."flightlog.inspect.illegal"'), '["VARCHAR"]'),
                    []::VARCHAR[]) AS illegal
    FROM spans
    WHERE run_id = $run_id
      AND json_extract_string(attributes, '$."flightlog.inspect.model"') = 'true'
      AND json_extract_string(attributes, '$."flightlog.inspect.features"') IS NOT NULL
), names AS (
    SELECT span_id, lower(trim(n)) AS name
    FROM (SELECT span_id, unnest(list_concat(illegal, string_split($extra, ','))) AS n FROM fits)
    WHERE trim(n) <> ''
), feats AS (
    SELECT span_id, start_time, op, estimator, file, line, code, unnest(features) AS feature FROM fits
)
SELECT f.op, f.estimator, f.file, f.line, f.code, f.feature, string_agg(DISTINCT n.name, ', ') AS illegal_name,
       f.span_id
FROM feats f JOIN names n ON n.span_id = f.span_id
WHERE lower(f.feature) = n.name
   OR starts_with(lower(f.feature), n.name || '_')
   OR ends_with(lower(f.feature), '__' || n.name)
   OR contains(lower(f.feature), '__' || n.name || '_')
GROUP BY ALL
ORDER BY min(f.start_time), f.feature

-- name: assertion_rate
-- severity: error
-- description: the share of checked items that failed a model assertion is above max_rate
-- needs: fl.check results in this run | SELECT count(*) FROM assertions WHERE run_id = $run_id AND item_id IS NULL
-- param max_rate = 0.05 : highest acceptable failure rate per assertion
-- fl.check writes one summary row per assertion per call: item_id NULL, severity = items checked,
-- message = {"checked": n, "failed": k}. Failure rows carry the item id and its severity.
WITH s AS (
    SELECT assertion, epoch, severity AS checked,
           CASE WHEN json_valid(message) THEN CAST(message::JSON->>'failed' AS DOUBLE) END AS failed
    FROM assertions
    WHERE run_id = $run_id AND item_id IS NULL
)
SELECT assertion, CAST(sum(checked) AS BIGINT) AS checked, CAST(sum(failed) AS BIGINT) AS failed,
       round(sum(failed) / sum(checked), 4) AS rate,
       min(epoch) FILTER (WHERE failed > 0) AS first_epoch
FROM s
GROUP BY assertion
HAVING sum(checked) > 0 AND sum(failed) / sum(checked) > $max_rate
ORDER BY rate DESC

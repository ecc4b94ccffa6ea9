-- name: overfitting
-- severity: warn
-- description: the train/validation gap widens while the validation metric gets worse than its best
-- needs: validation metric (val_X) with its training counterpart (train_X or X) | SELECT count(*) FROM (SELECT DISTINCT name FROM metric_points) v, (SELECT DISTINCT name FROM metric_points) t WHERE regexp_matches(v.name, '^(val|valid|validation|eval)[_/.](.+)$') AND t.name IN ('train_' || regexp_extract(v.name, '^(val|valid|validation|eval)[_/.](.+)$', 2), 'train/' || regexp_extract(v.name, '^(val|valid|validation|eval)[_/.](.+)$', 2), 'train.' || regexp_extract(v.name, '^(val|valid|validation|eval)[_/.](.+)$', 2), regexp_extract(v.name, '^(val|valid|validation|eval)[_/.](.+)$', 2))
-- param min_increase = 0.1 : the gap must grow by this fraction of the best validation value
-- param min_points = 4 : points both metrics need
-- param higher_better = 'acc|auc|f1|precision|recall|score|iou|map' : suffixes where higher is better
-- Pairs metrics by name: val_X / valid_X / validation_X / eval_X (also with '/' or '.') against
-- train_X or X; the suffix X decides the direction.
WITH v AS (
    SELECT name AS val_name, regexp_extract(name, '^(val|valid|validation|eval)[_/.](.+)$', 2) AS suffix
    FROM (SELECT DISTINCT name FROM metric_points)
    WHERE regexp_matches(name, '^(val|valid|validation|eval)[_/.](.+)$')
), pairs AS (
    SELECT v.val_name, t.name AS train_name, v.suffix,
           CASE WHEN regexp_matches(v.suffix, $higher_better) THEN -1 ELSE 1 END AS sign,
           row_number() OVER (PARTITION BY v.val_name ORDER BY (t.name = v.suffix)) AS pref
    FROM v JOIN (SELECT DISTINCT name FROM metric_points) t
      ON t.name IN ('train_' || v.suffix, 'train/' || v.suffix, 'train.' || v.suffix, v.suffix)
    QUALIFY pref = 1
), g AS (
    SELECT p.val_name, p.train_name, p.sign, a.point, a.epoch, a.mean AS val, b.mean AS train,
           p.sign * (a.mean - b.mean) AS gap
    FROM pairs p
    JOIN metric_points a ON a.name = p.val_name
    JOIN metric_points b ON b.name = p.train_name AND b.point = a.point
    WHERE a.point IS NOT NULL AND a.mean IS NOT NULL AND b.mean IS NOT NULL
), per AS (
    SELECT val_name, train_name, any_value(sign) AS sign, count(*) AS points,
           arg_min(val, sign * val) AS val_best, arg_min(epoch, sign * val) AS best_epoch,
           arg_min(gap, sign * val) AS gap_at_best, min(gap) AS gap_min,
           arg_max(val, point) AS val_last, arg_max(gap, point) AS gap_last, max(epoch) AS last_epoch
    FROM g GROUP BY val_name, train_name
)
SELECT val_name AS val_metric, train_name AS train_metric, points, best_epoch, val_best, val_last,
       gap_at_best, gap_last, last_epoch
FROM per
WHERE points >= $min_points
  AND sign * (val_last - val_best) > 0
  AND gap_last - gap_min > $min_increase * greatest(abs(val_best), 1e-12)
ORDER BY val_metric

#!/usr/bin/env bash
# Not part of the test suite (too long for CI): N consecutive two-process runs over gloo, alternating
# detection/dist_train.sh and detection/dist_test.sh on the tiny RetinaNet, and a count of the ones that did not end
# with status 0 (docs/gloo_exit_abort.md is what it looks for). Run it under load, e.g. beside the test suite.
#
#   bash tests/stress/two_process_runs.sh 50 [WORK_DIR]
set -u
N=${1:-50}
WORK=${2:-$(mktemp -d)}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DET=$REPO/detection
CFG=$DET/configs/tiny/retinanet_scalablevit-tiny_fpn_tiny-coco.py
DATA=$WORK/tiny_coco
python "$DET/tools/make_tiny_coco.py" --out "$DATA" --num-train 8 --num-val 4 > /dev/null
OWN=(--data-root "$DATA" --classes square,disc,triangle)
failed=0
start=$(date +%s)
for i in $(seq 1 "$N"); do
    if (( i % 2 == 1 )); then
        what=train
        (cd "$WORK" && bash "$DET/dist_train.sh" "$CFG" 2 "${OWN[@]}" --work-dir "$WORK/run" \
            --cfg-options train_cfg.max_epochs=1 train_cfg.val_interval=1 model.test_cfg.score_thr=0.001) \
            > "$WORK/log_$i.txt" 2>&1
    else
        what=test
        (cd "$WORK" && bash "$DET/dist_test.sh" "$CFG" "$WORK/run/epoch_1.pth" 2 "${OWN[@]}" --work-dir "$WORK/run" \
            --score-thr 0.001) > "$WORK/log_$i.txt" 2>&1
    fi
    status=$?
    if [[ $status != 0 ]]; then
        failed=$((failed + 1))
        echo "run $i ($what): exit status $status; $(grep -m1 -E 'terminate called|error' "$WORK/log_$i.txt")"
    fi
done
echo "$((N - failed)) of $N two-process runs ended with status 0 ($(( $(date +%s) - start )) s; logs in $WORK)"
[[ $failed == 0 ]]

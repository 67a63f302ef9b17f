#!/usr/bin/env bash
# Runs the demo commands of README.md and docs/*.md as written, in order, from the repository root of a clean
# clone, and keeps what each printed: the numbers the pages quote come from this log.
#   bash bench/docs_commands.sh            # log in results/docs_commands.log (about 12 minutes on 2 CPU cores)
# Stops at the first command that fails. Needs no network (HF_HUB_OFFLINE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTHON=${PYTHON:-python}
mkdir -p results
LOG=results/docs_commands.log
: > "$LOG"

run() {  # run one command as the docs write it; its output goes to the terminal and the log
    echo "\$ $*" | tee -a "$LOG"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$LOG"
    echo "# exit 0, $((SECONDS - t0)) s" | tee -a "$LOG"
}

CK=checkpoints/demo/covid_hybrid_convnext_vit_embed_128_seed_0/covid_hybrid_convnext_vit_embed_128_seed_0_best_ckpt.pth
XCK=checkpoints/xmir/covid_hybrid_convnext_vit_embed_128_seed_0/covid_hybrid_convnext_vit_embed_128_seed_0_best_ckpt.pth

# README quick start
run $PYTHON train.py --demo
# docs/evaluate.md, docs/concepts.md (hierarchy-aware metrics)
run $PYTHON test.py --resume $CK --dataset-dir data/demo --test-image-list data/demo/test_split.txt \
    --exclude-same-patient --save-dir results/demo
# docs/compare.md, docs/fusion.md
run bash run_backbone_comparison.sh
E=results/backbone_comparison/embeddings
run $PYTHON test.py --embeddings $E/model1.npy --exclude-same-patient --save-dir results/model1
run $PYTHON test.py --embeddings $E/model2.npy --exclude-same-patient --save-dir results/model2
run $PYTHON test.py --embeddings $E/fused.npy --exclude-same-patient --save-dir results/fused \
    --compare-with results/model1 results/model2
# docs/ood.md
run $PYTHON train.py --demo --exclude-classes COVID-19 -p 2 --save-dir checkpoints/xmir
run $PYTHON ood.py --resume $XCK --dataset-dir data/demo --train-image-list data/demo/train_split.txt \
    --test-image-list data/demo/test_split.txt --ood-transforms invert,rot90,hflip,blur,noise --k 5 \
    --save-dir results/ood_demo
# docs/concepts.md
run $PYTHON extract_embeddings.py --resume $CK --dataset-dir data/demo --test-dataset-dir data/demo/train \
    --test-image-list data/demo/train_split.txt --output results/emb/train.npy
run $PYTHON extract_embeddings.py --resume $CK --dataset-dir data/demo --test-image-list data/demo/test_split.txt \
    --output results/emb/test.npy
run $PYTHON concepts.py probe --embeddings results/emb/train.npy --concept-labels data/demo/concept_labels.csv \
    --save-dir results/probes
run $PYTHON concepts.py profile --probes results/probes/probes.npz --embeddings results/emb/test.npy \
    --output results/profile_test.csv
run $PYTHON concepts.py explain --embeddings results/emb/test.npy --probes results/probes/probes.npz \
    --query demo0020-0 demo0031-0 --k 8 --exclude-same-patient --save-dir results/concepts_explain
# docs/compare.md: the 4-way demo (two stand-in encoders)
run $PYTHON data/make_standin_encoders.py --out data/demo_encoders --names raddino
run env BACKBONES="trained:demo; atto=--model convnextv2 --convnext-backbone convnextv2_atto --no-pretrained \
--img-size 64; raddino=--model raddino --pretrained-weights data/demo_encoders/raddino; xrv=--model xrv --no-pretrained" \
    OUT_DIR=results/demo4 bash run_backbone_comparison.sh --overwrite
# docs/explain.md: the explain demo
run $PYTHON data/make_demo_data.py --out data/demo_explain --num-patients 240 --images-per-patient 2 --size 128 --force
run $PYTHON train.py --model democnn --img-size 128 --embedding-dim 64 --mining batch_all -p 3 -k 16 --lr 1e-3 \
    --backbone-lr-mult 1 --exclude-same-patient --val-fraction 0.15 --epochs 8 --workers 0 --overwrite \
    --dataset-dir data/demo_explain --train-image-list data/demo_explain/train_split.txt \
    --test-image-list data/demo_explain/test_split.txt --save-dir checkpoints/explain_demo
run $PYTHON explain.py --resume checkpoints/explain_demo/covid_democnn_embed_64_seed_0/covid_democnn_embed_64_seed_0_best_ckpt.pth \
    --dataset-dir data/demo_explain --test-image-list data/demo_explain/test_split.txt --exclude-same-patient \
    --method layercam --layers -3 --topk 3 --num-queries 8 --mask-dir data/demo_explain/masks --evaluate \
    --road-percentiles 20 50 80 --sanity --workers 0 --overwrite --save-dir results/explain_democnn
# docs/explore.md
run $PYTHON explore.py --demo
# docs/audit.md
run $PYTHON audit_data.py --dataset-dir data/demo --train-image-list data/demo/train_split.txt \
    --test-image-list data/demo/test_split.txt --save-dir results/audit_demo
run $PYTHON audit_data.py --dataset-dir data/demo --train-image-list data/demo/train_split.txt \
    --test-image-list data/demo/test_split.txt --resume $CK --save-dir results/audit_cosine
# (docs/audit.md: the same with --cosine-calibration 0 --write-clean-list X refuses the list, exit 2)
if [[ -f ../shared/data/covidx/train_split.txt ]]; then
    run $PYTHON audit_data.py --no-images --train-image-list ../shared/data/covidx/train_split.txt \
        --test-image-list ../shared/data/covidx/test_COVIDx4.txt --save-dir results/audit_covidx
fi
# docs/models.md
run $PYTHON test_hybrid_model.py
echo "all commands ran; log: $LOG"

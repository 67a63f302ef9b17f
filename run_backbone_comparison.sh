#!/usr/bin/env bash
# Backbone comparison in three steps: embeddings of model 1, embeddings of model 2, test_backbone.py.
#
# Demo (nothing configured; offline, a few minutes on a CPU): generates data/demo if absent, trains the tiny demo
# model with `train.py --demo` if no demo checkpoint exists, and compares it with an untrained tiny ConvNeXtV2:
#     bash run_backbone_comparison.sh
#
# Real data, the paper's pair (trained ConvNeXtV2 checkpoint against frozen ConceptCLIP):
#     DATASET_DIR=/data/covidx TEST_LIST=/data/covidx/test_COVIDx4.txt \
#     CONVNEXT_CKPT=checkpoints/covid_convnextv2_.../..._best_ckpt.pth CONCEPTCLIP_PATH=/models/ConceptCLIP \
#     bash run_backbone_comparison.sh
# Multi-GPU extraction: NPROC=4 (torchrun). CPU: DEVICE=cpu. Any two models: MODEL1_ARGS / MODEL2_ARGS hold the
# extract_embeddings.py model flags (e.g. MODEL2_ARGS="--resume other_best_ckpt.pth").
# Interpreter: PYTHON=/path/to/venv/bin/python (default: python on PATH); it must import torch.
# Before any folder is made or image embedded, every model is checked in one line each: a checkpoint that is no
# image model (e.g. a train_fusion.py head) and pretrained weights missing offline (ConceptCLIP) stop the run.
# A query's own patient's images are not counted as results (EXCLUDE_SAME_PATIENT=1, the default since issue 19,
# as in the demo; 0 keeps them).
# N-way comparison of any number of models: BACKBONES, whitespace-separated entries of three kinds:
#     NAME:CHECKPOINT   a trained checkpoint (extract_embeddings.py --resume CHECKPOINT); NAME:demo = the demo
#                       model (DEMO_CKPT, else the newest checkpoints/demo/*/*_best_ckpt.pth, else trained first)
#     NAME              a registry model: --model NAME plus the flags in ARGS_NAME when set, e.g.
#                       ARGS_raddino="--pretrained-weights /models/rad-dino"; when ARGS_NAME holds --model or
#                       --resume itself, NAME is only the label and ARGS_NAME all the model flags
#     NAME=FLAGS        the extract_embeddings.py model flags inline; flags hold spaces, so separate the entries
#                       of such a BACKBONES with ';' instead of whitespace
#   NAME: letters, digits, _ (it names EMB_DIR/NAME.npy and the rows of the table). For example
#     BACKBONES="hybrid:checkpoints/RUN/RUN_best_ckpt.pth raddino biomedclip xrv conceptclip" \
#     ARGS_conceptclip="--conceptclip-path /models/ConceptCLIP" DATASET_DIR=... TEST_LIST=... \
#     bash run_backbone_comparison.sh
#   and a 4-way comparison on the demo data (the demo model and three untrained tiny encoders at 64 px):
#     BACKBONES="trained:demo; atto=--model convnextv2 --convnext-backbone convnextv2_atto --no-pretrained \
#     --img-size 64; r10=--model timm --backbone resnet10t --no-pretrained --img-size 64; tvit=--model timm \
#     --backbone test_vit --no-pretrained --img-size 64" bash run_backbone_comparison.sh
#   It runs test_backbone.py --embeddings NAME=EMB_DIR/NAME.npy ... (per-model table with CIs, overlap and
#   Spearman matrices, paired tests with Holm correction, held-out pair fusions and RRF over all); with a training
#   list (TRAIN_LIST; the demo's) and LEARNED_FUSION=1 it trains one learned fusion head on FUSION_SUBSET (names;
#   empty = every entry) and adds its row. Without BACKBONES the two-model comparison below runs as before.
# Embeddings already in EMB_DIR are reused (REEXTRACT=1 extracts again). Results already in OUT_DIR are never
# replaced silently: the script stops unless --overwrite (or OVERWRITE=1) is given.
# Options: -h/--help (this text), --overwrite. Everything else is set through the environment variables below.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; grep -E '^[A-Z_0-9]+=\$\{' "$0" | sed 's/^/    /'; }
FORCE=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --overwrite) FORCE=1 ;;
        *) echo "error: unknown option $arg (options: --help, --overwrite; settings go in environment variables)" >&2
           exit 2 ;;
    esac
done

# ----------------------------------------------------------------------------- settings (override from the environment)
PYTHON=${PYTHON:-python}
DATASET=${DATASET:-covid}                       # label map: covid, covidx-cxr2, generic
DATASET_DIR=${DATASET_DIR:-}                    # empty -> demo data
TEST_DATASET_DIR=${TEST_DATASET_DIR:-}          # default DATASET_DIR/test when it exists, else DATASET_DIR
TEST_LIST=${TEST_LIST:-}
CONVNEXT_CKPT=${CONVNEXT_CKPT:-}                # trained ConvNeXtV2 checkpoint (train.py --model convnextv2)
CONCEPTCLIP_PATH=${CONCEPTCLIP_PATH:-JerrryNie/ConceptCLIP}   # HF id (needs the HF cache) or local folder
MODEL1_NAME=${MODEL1_NAME:-}
MODEL2_NAME=${MODEL2_NAME:-}
MODEL1_ARGS=${MODEL1_ARGS:-}
MODEL2_ARGS=${MODEL2_ARGS:-}
BACKBONES=${BACKBONES:-}                        # N-way mode: NAME:CHECKPOINT, NAME (+ ARGS_NAME), NAME=FLAGS entries
FUSION_SUBSET=${FUSION_SUBSET:-}                # N-way: the BACKBONES names the learned head fuses; empty = all
OUT_DIR=${OUT_DIR:-results/backbone_comparison}
EMB_DIR=${EMB_DIR:-$OUT_DIR/embeddings}
BATCH_SIZE=${BATCH_SIZE:-32}
CONCEPTCLIP_BATCH_SIZE=${CONCEPTCLIP_BATCH_SIZE:-8}
WORKERS=${WORKERS:-}                            # empty -> the scripts' default (utils.default_workers: this machine's cores, at most 4)
DEVICE=${DEVICE:-}                              # empty -> cuda when available, else cpu
NPROC=${NPROC:-1}                               # > 1: torchrun --standalone --nproc_per_node=NPROC
K=${K:-5}
K_VALUES=${K_VALUES:-1 5 10}                    # N-way: the k of P@k and R@k in the per-model table
FUSION_ALPHAS=${FUSION_ALPHAS:-0.3 0.5 0.7}
VISUALIZE_SAMPLES=${VISUALIZE_SAMPLES:-5}
EXCLUDE_SAME_PATIENT=${EXCLUDE_SAME_PATIENT:-1}    # 1: a query's own patient's images are not results (as the demo); 0: kept
SEED=${SEED:-0}
TRAIN_LIST=${TRAIN_LIST:-}                      # training list for the learned fusion (demo: its train_split.txt)
LEARNED_FUSION=${LEARNED_FUSION:-1}             # 0: skip train_fusion.py (needs TRAIN_LIST)
FUSION_HEAD=${FUSION_HEAD:-mlp}                 # concat, mlp or gated
FUSION_EPOCHS=${FUSION_EPOCHS:-10}
OVERWRITE=${OVERWRITE:-0}                       # 1 = --overwrite: replace results already in OUT_DIR
REEXTRACT=${REEXTRACT:-0}                       # 1: extract embeddings again even when EMB_DIR has them
[[ "$FORCE" == 1 ]] && OVERWRITE=1

# ----------------------------------------------------------------------------- checks before any work
# N-way: BACKBONES -> BB_NAMES[i] and BB_FLAGS[i] (extract_embeddings.py model flags); "demo" entries get theirs
# once the demo checkpoint is known. Bad entries stop here (plain bash, before the interpreter is even tried).
BB_NAMES=()
BB_FLAGS=()
parse_backbones() {
    local entries=() e name var extra
    if [[ "$1" == *";"* ]]; then IFS=';' read -r -a entries <<< "$1"; else read -r -a entries <<< "$1"; fi
    for e in "${entries[@]}"; do
        e="${e#"${e%%[![:space:]]*}"}"; e="${e%"${e##*[![:space:]]}"}"   # trim
        [[ -z "$e" ]] && continue
        if [[ "$e" =~ ^([A-Za-z][A-Za-z0-9_]*)=(.+)$ ]]; then
            name=${BASH_REMATCH[1]}; BB_FLAGS+=("${BASH_REMATCH[2]}")
        elif [[ "$e" =~ ^([A-Za-z][A-Za-z0-9_]*):(.+)$ ]]; then
            name=${BASH_REMATCH[1]}
            if [[ "${BASH_REMATCH[2]}" == demo ]]; then
                BB_FLAGS+=(DEMO)
            else
                BB_FLAGS+=("--resume ${BASH_REMATCH[2]}")
            fi
        elif [[ "$e" =~ ^[A-Za-z][A-Za-z0-9_]*$ ]]; then
            name=$e; var="ARGS_$e"; extra=${!var:-}
            if [[ " $extra" == *" --model"* || " $extra" == *" --resume"* ]]; then
                BB_FLAGS+=("$extra")
            else
                BB_FLAGS+=("--model $e${extra:+ $extra}")
            fi
        else
            local hint="entries are NAME:CHECKPOINT, NAME (flags in ARGS_NAME) or NAME=FLAGS; NAME: letters, digits, _"
            [[ "$e" == -* ]] && hint="an entry with flags (NAME=--model ...) needs ';' between the entries of BACKBONES"
            echo "error: BACKBONES entry '$e': $hint (see --help)" >&2
            exit 2
        fi
        for other in "${BB_NAMES[@]}"; do
            if [[ "$other" == "$name" ]]; then
                echo "error: BACKBONES names '$name' twice; give each entry its own NAME" >&2
                exit 2
            fi
        done
        BB_NAMES+=("$name")
    done
    if [[ ${#BB_NAMES[@]} -lt 2 ]]; then
        echo "error: BACKBONES='$1' holds ${#BB_NAMES[@]} entry; give two or more models to compare" >&2
        exit 2
    fi
}
[[ -n "$BACKBONES" ]] && parse_backbones "$BACKBONES"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "error: the interpreter PYTHON=$PYTHON cannot import torch; point PYTHON at the environment where the" \
         "requirements are installed, e.g. PYTHON=/path/to/venv/bin/python bash $0" >&2
    exit 2
fi
EXISTING=()
RESULT_FILES=(backbone_comparison_results.json backbone_comparison_results.npz overlap_histogram.png)
[[ -n "$BACKBONES" ]] && RESULT_FILES=(results.json nway_per_query.npz overlap_matrix.png spearman_matrix.png)
for f in "${RESULT_FILES[@]}"; do
    [[ -e "$OUT_DIR/$f" ]] && EXISTING+=("$OUT_DIR/$f")
done
if [[ ${#EXISTING[@]} -gt 0 && "$OVERWRITE" != 1 ]]; then
    echo "error: $OUT_DIR already holds results (${EXISTING[*]}); choose another OUT_DIR or pass --overwrite" \
         "(OVERWRITE=1) to replace them" >&2
    exit 2
fi
# demo only
DEMO_DIR=${DEMO_DIR:-data/demo}
DEMO_CKPT=${DEMO_CKPT:-}                        # empty -> newest checkpoints/demo/*/*_best_ckpt.pth, else train one
DEMO_EPOCHS=${DEMO_EPOCHS:-4}
DEMO_SAVE_DIR=${DEMO_SAVE_DIR:-checkpoints/demo}

# ----------------------------------------------------------------------------- the two models
if [[ -z "$DATASET_DIR" ]]; then
    echo "== no DATASET_DIR set: running the demo on $DEMO_DIR (set DATASET_DIR, TEST_LIST, CONVNEXT_CKPT for real data)"
    DEMO_MODE=1
    DATASET_DIR=$DEMO_DIR
    TEST_LIST=${TEST_LIST:-$DEMO_DIR/test_split.txt}
    TRAIN_LIST=${TRAIN_LIST:-$DEMO_DIR/train_split.txt}
    if [[ -z "$MODEL1_ARGS" && -z "$BACKBONES" ]]; then
        if [[ -z "$DEMO_CKPT" ]]; then
            DEMO_CKPT=$(ls -t "$DEMO_SAVE_DIR"/*/*_best_ckpt.pth 2>/dev/null | head -n 1 || true)
        fi
        if [[ -z "$DEMO_CKPT" ]]; then
            TRAIN_DEMO=1                        # trained below, once every check has passed
        else
            MODEL1_ARGS="--resume $DEMO_CKPT"
        fi
        MODEL1_NAME=${MODEL1_NAME:-demo-trained}
    fi
    # Untrained: random weights, so the demo needs no download; the point is to see the workflow run.
    MODEL2_ARGS=${MODEL2_ARGS:-"--model convnextv2 --convnext-backbone convnextv2_atto --no-pretrained --img-size 64"}
    MODEL2_NAME=${MODEL2_NAME:-untrained-atto}
else
    if [[ -z "$TEST_LIST" ]]; then
        echo "error: DATASET_DIR is set but TEST_LIST is not; give the test list file (e.g. \$DATASET_DIR/test_COVIDx4.txt)" >&2
        exit 2
    fi
    if [[ -z "$MODEL1_ARGS" && -z "$BACKBONES" ]]; then
        if [[ -z "$CONVNEXT_CKPT" ]]; then
            echo "error: set CONVNEXT_CKPT to a trained ConvNeXtV2 checkpoint (train.py --model convnextv2 ...)" \
                 "or MODEL1_ARGS to other extract_embeddings.py model flags" >&2
            exit 2
        fi
        MODEL1_ARGS="--resume $CONVNEXT_CKPT"
    fi
    MODEL2_ARGS=${MODEL2_ARGS:-"--model conceptclip --conceptclip-path $CONCEPTCLIP_PATH"}
fi
if [[ -n "$TEST_DATASET_DIR" ]]; then
    IMAGE_DIR=$TEST_DATASET_DIR
elif [[ -d "$DATASET_DIR/test" ]]; then
    IMAGE_DIR=$DATASET_DIR/test
else
    IMAGE_DIR=$DATASET_DIR
fi

# ----------------------------------------------------------------------------- every model, before any work
# A checkpoint that is no image model (a train_fusion.py head under the same *_best_ckpt.pth naming) and
# pretrained weights that are not on this machine offline (ConceptCLIP) stop the run here, in one line, before a
# folder is made or an image embedded; model.check_weights looks at files and the hub cache only.
CHECK_MODELS=$(cat <<'PY'
import argparse, shlex, sys
import model as M
p = argparse.ArgumentParser(add_help=False, parents=[M.get_model_parser()], exit_on_error=False)
p.add_argument("--resume", default=None)
p.set_defaults(model=None)
for var, flags in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        a, _ = p.parse_known_args(shlex.split(flags))  # the other extract_embeddings.py flags are its own business
        if a.resume:  # rebuilt from the checkpoint without downloads; ConceptCLIP still needs its code and config
            ckpt = M.read_checkpoint(a.resume, kind="image")
            M.check_weights(ckpt["model_name"], dict(ckpt["model_args"], pretrained=False))
        else:
            name, args = M.model_args_from_cli(a)
            M.check_weights(name or "hybrid_convnext_vit", args)  # extract_embeddings.py's default model
    except (ValueError, argparse.ArgumentError) as e:
        sys.exit(f"error: {var}=\"{flags}\": {e}")
PY
)
MODELS_TO_CHECK=()
if [[ -n "$BACKBONES" ]]; then
    for i in "${!BB_NAMES[@]}"; do
        if [[ "${BB_FLAGS[$i]}" == DEMO ]]; then
            if [[ "${DEMO_MODE:-0}" != 1 && -z "$DEMO_CKPT" ]]; then
                echo "error: BACKBONES entry ${BB_NAMES[$i]}:demo needs the demo data (no DATASET_DIR) or DEMO_CKPT" >&2
                exit 2
            fi
            if [[ -z "$DEMO_CKPT" ]]; then
                DEMO_CKPT=$(ls -t "$DEMO_SAVE_DIR"/*/*_best_ckpt.pth 2>/dev/null | head -n 1 || true)
            fi
            if [[ -z "$DEMO_CKPT" ]]; then TRAIN_DEMO=1; continue; fi   # trained below, after every check
            BB_FLAGS[$i]="--resume $DEMO_CKPT"
        fi
        MODELS_TO_CHECK+=("BACKBONES entry ${BB_NAMES[$i]}" "${BB_FLAGS[$i]}")
    done
    FUSE=(${FUSION_SUBSET:-${BB_NAMES[*]}})
    for f in "${FUSE[@]}"; do
        if [[ " ${BB_NAMES[*]} " != *" $f "* ]]; then
            echo "error: FUSION_SUBSET names '$f', which is not a BACKBONES entry (${BB_NAMES[*]})" >&2
            exit 2
        fi
    done
else
    [[ -n "$MODEL1_ARGS" ]] && MODELS_TO_CHECK+=(MODEL1_ARGS "$MODEL1_ARGS")
    MODELS_TO_CHECK+=(MODEL2_ARGS "$MODEL2_ARGS")
fi
if [[ ${#MODELS_TO_CHECK[@]} -gt 0 ]] && ! "$PYTHON" -c "$CHECK_MODELS" "${MODELS_TO_CHECK[@]}"; then
    exit 2
fi

if [[ "${DEMO_MODE:-0}" == 1 && ! -f "$DEMO_DIR/test_split.txt" ]]; then
    "$PYTHON" data/make_demo_data.py --out "$DEMO_DIR"
fi
if [[ "${TRAIN_DEMO:-0}" == 1 ]]; then
    echo "== training the tiny demo model ($DEMO_EPOCHS epochs) into $DEMO_SAVE_DIR"
    "$PYTHON" train.py --demo --dataset-dir "$DEMO_DIR" --epochs "$DEMO_EPOCHS" --save-dir "$DEMO_SAVE_DIR"
    DEMO_CKPT=$(ls -t "$DEMO_SAVE_DIR"/*/*_best_ckpt.pth | head -n 1)
    MODEL1_ARGS="--resume $DEMO_CKPT"
    for i in "${!BB_FLAGS[@]}"; do [[ "${BB_FLAGS[$i]}" == DEMO ]] && BB_FLAGS[$i]="--resume $DEMO_CKPT"; done
fi

# ----------------------------------------------------------------------------- steps 1 and 2: embeddings
mkdir -p "$EMB_DIR" "$OUT_DIR"
if [[ "$NPROC" -gt 1 ]]; then
    LAUNCH=(torchrun --standalone "--nproc_per_node=$NPROC")
else
    LAUNCH=("$PYTHON")
fi
COMMON=(--dataset "$DATASET" --dataset-dir "$DATASET_DIR" --test-image-list "$TEST_LIST" --batch-size "$BATCH_SIZE"
        --conceptclip-batch-size "$CONCEPTCLIP_BATCH_SIZE" --seed "$SEED")
[[ -n "$WORKERS" ]] && COMMON+=(--workers "$WORKERS")
[[ -n "$TEST_DATASET_DIR" ]] && COMMON+=(--test-dataset-dir "$TEST_DATASET_DIR")
[[ -n "$DEVICE" ]] && COMMON+=(--device "$DEVICE")
[[ "$REEXTRACT" == 1 ]] && COMMON+=(--overwrite)

extract() {  # extract NAME "MODEL FLAGS" [extra flags: another list]
    local out="$EMB_DIR/$1.npy" flags extra=("${@:3}")
    read -r -a flags <<< "$2"
    if [[ -f "$out" && "$REEXTRACT" != 1 ]]; then
        echo "== reusing $out (REEXTRACT=1 extracts again)"
        return
    fi
    echo "== extracting $1: ${flags[*]}"
    "${LAUNCH[@]}" extract_embeddings.py "${flags[@]}" "${COMMON[@]}" "${extra[@]}" --output "$out"
}
# learned fusion: trained on the TRAINING list's embeddings (epoch chosen on its patient-disjoint validation split),
# applied to the test list's: the test list is never used for training or selection
learned_fusion() {  # learned_fusion OUTPUT LEARNED_NAME NAME "MODEL FLAGS" [NAME "MODEL FLAGS" ...]; sets LEARNED
    local output=$1 label=$2 train_dir=$DATASET_DIR names=() train_sets=() test_sets=() fusion_dir=$OUT_DIR/fusion
    local fusion_flags=(--seed "$SEED" --device cpu)  # the head is small; train_fusion.py's default is CUDA when there
    shift 2
    [[ -d "$DATASET_DIR/train" ]] && train_dir=$DATASET_DIR/train
    [[ "$OVERWRITE" == 1 ]] && fusion_flags+=(--overwrite)
    while [[ $# -gt 0 ]]; do
        extract "train_$1" "$2" --test-image-list "$TRAIN_LIST" --test-dataset-dir "$train_dir"
        names+=("$1")
        train_sets+=("$EMB_DIR/train_$1.npy")
        test_sets+=("$EMB_DIR/$1.npy")
        shift 2
    done
    echo "== training the $FUSION_HEAD fusion head on the training list's embeddings of $(IFS=+; echo "${names[*]}")"
    "$PYTHON" train_fusion.py --embeddings "${train_sets[@]}" --head "$FUSION_HEAD" --epochs "$FUSION_EPOCHS" \
        --save-dir "$fusion_dir" "${fusion_flags[@]}"
    local ckpt
    ckpt=$(ls -t "$fusion_dir"/fusion_"$FUSION_HEAD"_*/*_best_ckpt.pth | head -n 1)
    "$PYTHON" train_fusion.py --apply "$ckpt" --embeddings "${test_sets[@]}" --output "$output" "${fusion_flags[@]}"
    LEARNED=(--learned-embeddings "$output" --learned-name "$label")
}
if [[ -n "$BACKBONES" ]]; then
    # ----------------------------------------------------------------------------- N-way: every entry, then compare
    for i in "${!BB_NAMES[@]}"; do extract "${BB_NAMES[$i]}" "${BB_FLAGS[$i]}"; done
    LEARNED=()
    if [[ "$LEARNED_FUSION" == 1 && -n "$TRAIN_LIST" ]]; then
        FUSED=()  # NAME "MODEL FLAGS" of each FUSION_SUBSET entry
        for f in "${FUSE[@]}"; do
            for i in "${!BB_NAMES[@]}"; do [[ "${BB_NAMES[$i]}" == "$f" ]] && FUSED+=("$f" "${BB_FLAGS[$i]}"); done
        done
        # the fused set belongs to this run (its subset and head), not to the shared EMB_DIR
        learned_fusion "$OUT_DIR/fusion/fused.npy" "Learned $FUSION_HEAD fusion ($(IFS=+; echo "${FUSE[*]}"))" \
            "${FUSED[@]}"
    fi
    read -r -a ALPHAS <<< "$FUSION_ALPHAS"
    read -r -a KS <<< "$K_VALUES"
    CMP=(--embeddings)
    for n in "${BB_NAMES[@]}"; do CMP+=("$n=$EMB_DIR/$n.npy"); done
    CMP+=(--save-dir "$OUT_DIR" --k "$K" --k-values "${KS[@]}" --fusion-alphas "${ALPHAS[@]}" --seed "$SEED"
         "${LEARNED[@]}")
    [[ "$OVERWRITE" == 1 ]] && CMP+=(--overwrite)
    [[ "$EXCLUDE_SAME_PATIENT" == 1 ]] && CMP+=(--exclude-same-patient)
    echo "== comparing ${BB_NAMES[*]}"
    "$PYTHON" test_backbone.py "${CMP[@]}"
    echo
    echo "Results: $OUT_DIR/results.json (everything), nway_per_query.npz (per query), overlap_matrix.png,"
    echo "         spearman_matrix.png; embeddings in $EMB_DIR/"
    exit 0
fi
extract model1 "$MODEL1_ARGS"
extract model2 "$MODEL2_ARGS"

# ----------------------------------------------------------------------------- step 2b: learned fusion
LEARNED=()
if [[ "$LEARNED_FUSION" == 1 && -n "$TRAIN_LIST" ]]; then
    learned_fusion "$EMB_DIR/fused.npy" "Learned $FUSION_HEAD fusion" model1 "$MODEL1_ARGS" model2 "$MODEL2_ARGS"
fi

# ----------------------------------------------------------------------------- step 3: comparison
read -r -a ALPHAS <<< "$FUSION_ALPHAS"
CMP=(--model1-embeddings "$EMB_DIR/model1.npy" --model2-embeddings "$EMB_DIR/model2.npy"
     --image-dir "$IMAGE_DIR" --image-list "$TEST_LIST"
     --save-dir "$OUT_DIR" --k "$K" --visualize-samples "$VISUALIZE_SAMPLES" --fusion-alphas "${ALPHAS[@]}"
     --seed "$SEED" "${LEARNED[@]}")
# names: MODEL1_NAME / MODEL2_NAME when set, else test_backbone.py names each set from its _meta.json
[[ -n "$MODEL1_NAME" ]] && CMP+=(--model1-name "$MODEL1_NAME")
[[ -n "$MODEL2_NAME" ]] && CMP+=(--model2-name "$MODEL2_NAME")
[[ "$OVERWRITE" == 1 ]] && CMP+=(--overwrite)
[[ "$EXCLUDE_SAME_PATIENT" == 1 ]] && CMP+=(--exclude-same-patient)
echo "== comparing ${MODEL1_NAME:-model 1} and ${MODEL2_NAME:-model 2}"
"$PYTHON" test_backbone.py "${CMP[@]}"

echo
echo "Results: $OUT_DIR/backbone_comparison_results.json (summary), backbone_comparison_results.npz (per query),"
echo "         $OUT_DIR/overlap_histogram.png, $OUT_DIR/query_*_comparison.png; embeddings in $EMB_DIR/"

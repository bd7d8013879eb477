#!/bin/bash
# The GPU sweep that chose the shipped teaching-model recipe (run once on an H200 via the
# device tool; logs in scripts/logs/teaching_recipe_*.log). Each recipe trains with
# scripts/train_teaching_model.py, then prints the leave-one-out loss increase of every layer.
# Finding: the 483 k-token corpus is memorised after ~1,200 steps of 32x128 tokens
# (A-D: validation PPL rises from 64 to 458-2,940), so the shipped recipe is E: 1,500 steps,
# cosine decay, validation PPL 59.9 vs 792 for the unigram baseline.
# Superseded (issue 11): that corpus split module by module, so calibration and validation text repeated
# training text (664 of 1,012 twelve-token calibration runs) and "memorised" was partly measured on leaks.
# The shipped model is now trained on CPU on the package-level, decontaminated split by
# `python scripts/train_teaching_model.py --resplit --device cpu --steps 1200 --eval-every 100`, keeping the
# weights of the lowest validation PPL; its manifest reports train and validation PPL side by side.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
nvidia-smi --query-gpu=name,memory.used --format=csv
python3 -c "import transformers, torch; print(transformers.__version__, torch.__version__)"
run() { name=$1; shift
  python3 scripts/train_teaching_model.py --out /tmp/runs/$name --data-from minilib/assets/teaching --device cuda "$@" > /tmp/runs/$name.log 2>&1
  python3 - "$name" >> /tmp/runs/$name.log 2>&1 <<'PY'
import sys, numpy as np, torch, minilib as ml
from transformers import LlamaForCausalLM, AutoTokenizer
d = f"/tmp/runs/{sys.argv[1]}"
m = LlamaForCausalLM.from_pretrained(d).cuda().eval(); tok = AutoTokenizer.from_pretrained(d)
from minilib.teaching import encode_documents, _read_corpus
docs = _read_corpus(d + "/corpus.jsonl.gz")
s = encode_documents(tok, [x for x in docs if x.split == "calibration"])
ids = s[: 64 * 128].view(64, 128)
g = ml.evaluation.LayerGame(m, ids, utility="neg_loss", mask_batch_size=12)
L = g.n_players; loo = np.ones((L, L), bool); np.fill_diagonal(loo, False)
v = g.losses(loo)
print("base loss", round(g.base_loss, 4), "empty", round(float(g.losses(np.zeros((1, L), bool))[0]), 3))
print("LOO dloss", np.round(v - g.base_loss, 4).tolist())
PY
  tar -C /tmp/runs -czf $OUT/$name.tgz $name
  cp /tmp/runs/$name.log $OUT/$name.log
}
mkdir -p /tmp/runs
run A --steps 4000 --batch-size 32 --lr 2e-3 &
run B --steps 8000 --batch-size 32 --lr 2e-3 &
run C --steps 6000 --batch-size 32 --lr 2e-3 --intermediate-size 512 &
run D --steps 6000 --batch-size 64 --lr 3e-3 &
wait
run E --steps 1500 --batch-size 32 --lr 2e-3 --eval-every 250 &
run F --steps 2500 --batch-size 16 --lr 2e-3 --eval-every 250 &
wait
ls -la $OUT

# Run from a checkout: PYTHONPATH=. OMP_NUM_THREADS=1 python measure.py ROUNDS OUT.json
"""Interleaved host-time rounds of itc_loss at the host probe (B=4, E=32, Q=64): fused (Triton launches
stubbed) and reference, fwd and fwd+bwd, each round timing every variant with fastvl.bench.host.host_us
(0.3 s budget, 10th percentile)."""
import os, sys, json, subprocess
os.environ["TRITON_INTERPRET"]="1"
import torch, contextlib
torch.set_num_threads(1)
import fastvl
from fastvl.bench import ops, host
case=[c for c in ops.cases("tiny") if c.op=="itc_loss"][0]
rounds=int(sys.argv[1]); out=sys.argv[2]
fns={}; counts={}
for v in ("triton","reference"):
    stub = host.stubbed_triton if v=="triton" else (lambda counter=None: contextlib.nullcontext())
    for kind in ops.PASSES:
        with stub(): fn,_=ops.prepare(case,v,kind,torch.device("cpu"),torch.float32)
        c=host.LaunchCounter()
        with stub(c), c: fn()
        fns[(v,kind)]=(fn,stub); counts[f"{v} {kind}"]=c.total
res={}
for _ in range(rounds):
    for (v,kind),(fn,stub) in fns.items():
        with stub(): us,_m=host.host_us(fn,0.3)
        res.setdefault(f"{v} {kind}",[]).append(round(us,1))
commit=subprocess.run(["git","rev-parse","--short","HEAD"],capture_output=True,text=True,cwd=os.path.dirname(os.path.dirname(fastvl.__file__))).stdout.strip()
doc={"measure":__doc__,"params":case.params,"fastvl":os.path.dirname(fastvl.__file__),"commit":commit,"launches":counts,"host_us_p10_per_round":res,"best_round":{k:min(v) for k,v in res.items()}}
json.dump(doc,open(out,"w"),indent=1); print(json.dumps(doc["best_round"]), counts)

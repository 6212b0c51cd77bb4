# Run from a checkout: PYTHONPATH=. OMP_NUM_THREADS=1 python measure_tensor_temp.py OUT.json
import os,sys; os.environ["TRITON_INTERPRET"]="1"
import torch, contextlib; torch.set_num_threads(1)
from fastvl.bench import ops, host
import fastvl
case=[c for c in ops.cases("tiny") if c.op=="itc_loss"][0]
args,kw,gi=case.make(torch.device("cpu"),torch.float32,torch.Generator().manual_seed(0))
args=list(args); temp=torch.tensor(0.07,requires_grad=True); args[4]=temp
res={}
for v in ("triton","reference"):
    stub = host.stubbed_triton if v=="triton" else (lambda counter=None: contextlib.nullcontext())
    def fb(v=v): fastvl.ops.itc_loss(*args, backend=v).backward()
    c=host.LaunchCounter()
    with stub(c), c: fb()
    res[v]=(fb,stub,c.total)
out={}
for _ in range(5):
    for v,(fb,stub,n) in res.items():
        with stub(): us,_m=host.host_us(fb,0.3)
        out.setdefault(v,[]).append(round(us))
print({v:(out[v],min(out[v]),res[v][2]) for v in out})
import json, subprocess
commit=subprocess.run(["git","rev-parse","--short","HEAD"],capture_output=True,text=True,cwd=os.path.dirname(os.path.dirname(fastvl.__file__))).stdout.strip()
json.dump({"measure":"itc_loss forward + backward at B=4, E=32, Q=64 with temp a tensor that requires grad (ALBEF's case); five interleaved rounds of fastvl.bench.host.host_us (0.3 s, 10th percentile), Triton launches stubbed","commit":commit,"host_us_p10_per_round":out,"best_round":{v:min(x) for v,x in out.items()},"launches":{v:r[2] for v,r in res.items()}},open(sys.argv[1],"w"),indent=1)

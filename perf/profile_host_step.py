import sys, time, cProfile, pstats, torch
sys.path.insert(0, '.')
from backend.engine.block_manager import BlockManager
from backend.engine.scheduler import Scheduler
from backend.engine.request import Request
from backend.engine.sampling_params import SamplingParams
from backend.engine.outputs import SampledTokens
from backend.engine.model_runner import ModelRunner
from backend.engine.sampler import Sampler
sched = Scheduler(BlockManager(40000, 16, True), 256, 8192, 4096)
gen = torch.Generator().manual_seed(0)
for i in range(256):
    n = int(torch.randint(64, 513, (1,), generator=gen))
    sched.add_request(Request(str(i), torch.randint(10, 128000, (n,), generator=gen).tolist(), SamplingParams(max_tokens=128, min_tokens=128), seed=i))
class R(ModelRunner):
    def __init__(self): self.block_size=16; self.device=torch.device('cpu')
r = R(); sampler = Sampler()
logits = torch.randn(256, 128256)
times = []
def run():
    while sched.has_unfinished():
        t = time.perf_counter()
        out = sched.schedule()
        batch = r.prepare_inputs(out)
        reqs = [c.request for c in out.chunks if c.samples]
        sampled = sampler(logits[:len(reqs)], reqs)
        sched.update_from_output(out, sampled)
        times.append((time.perf_counter() - t, len(out.chunks), out.num_batched_tokens))
cProfile.run('run()', '/tmp/prof')
dec = [t for t, n, tok in times if tok == n]
print('steps', len(times), 'decode steps', len(dec), 'median decode host ms', sorted(dec)[len(dec)//2]*1e3, 'total s', sum(t for t,_,_ in times))
pstats.Stats('/tmp/prof').sort_stats('cumtime').print_stats(18)

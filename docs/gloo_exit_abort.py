"""A gloo process group kept alive into the interpreter's teardown aborts the process (docs/gloo_exit_abort.md).

    torchrun --nproc_per_node=2 docs/gloo_exit_abort.py          # "terminate called without an active exception"
    FIX=1 torchrun --nproc_per_node=2 docs/gloo_exit_abort.py    # exits 0
"""
import gc
import os

import torch
import torch.distributed as dist

dist.init_process_group('gloo')
model = torch.nn.Linear(64, 64)
ddp = torch.nn.parallel.DistributedDataParallel(model)
for _ in range(3):
    ddp(torch.randn(8, 64)).sum().backward()
cycle = {'ddp': ddp}
cycle['self'] = cycle            # as mmengine's Runner <-> loops / hooks
del ddp, model
t = torch.randn(1 << 20)
work = dist.all_reduce(t, async_op=True)  # in flight in a gloo thread while Python finalizes
fut = work.get_future().then(lambda f: f.value())  # a Python callback the gloo thread must run with the GIL
if os.environ.get('FIX'):
    fut.wait()
    del work, fut, cycle
    gc.collect()  # the cycle goes, and with it the last reference to the process group
    dist.destroy_process_group()
else:
    dist.destroy_process_group()  # as before: the PG object survives (the cycle holds it)

"""Run under torchrun by tests/test_05_selftrain.py: 05_selftrain.py's main with a spy on
common.train_loop that all-gathers every rank's EMA teacher at the start of training and
prints whether it equals this rank's student and rank 0's teacher, then stops."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from conftest import load_stage  # noqa: E402

def spy(args, out_dir, model, step_loss, *a, **kw):
    teacher = torch.cat([p.detach().flatten() for p in kw["also_eval"]["teacher"].parameters()])
    student = torch.cat([p.detach().flatten() for p in model.parameters()])
    every = [torch.zeros_like(teacher) for _ in range(dist.get_world_size())]
    dist.all_gather(every, teacher)
    print(f"rank {dist.get_rank()}: teacher is the student {torch.equal(teacher, student)}; "
          f"teachers equal across ranks {all(torch.equal(every[0], t) for t in every)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    raise SystemExit(0)  # the start is what is checked; training is tested elsewhere


if __name__ == "__main__":
    common.train_loop = spy
    load_stage("05_selftrain").main(sys.argv[1:])

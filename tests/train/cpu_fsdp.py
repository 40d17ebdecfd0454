"""Run `ragtune` with accelerate's FSDP path on CPU processes, for tests only.

accelerate turns FSDP on only for GPU process groups; torch's FSDP2 itself runs on CPU with gloo.
This entry point reports a multi-CPU run as multi-GPU to accelerate (the device stays the CPU), so
`accelerate launch --config_file configs/accelerate/fsdp.yaml` exercises the code a GPU run takes:
sharded checkpoints, resume from them, and the gathered adapter at the end.
"""

from __future__ import annotations

import sys


def main() -> int:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.PartialState.__init__

    def cpu_as_gpu(self, cpu: bool = False, **kwargs):  # type: ignore[no-untyped-def]
        init(self, cpu=cpu, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.MULTI_GPU

    state.PartialState.__init__ = cpu_as_gpu
    from ragtune.cli import main as ragtune_main

    return ragtune_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

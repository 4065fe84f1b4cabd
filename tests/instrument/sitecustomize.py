"""Test instrumentation, loaded by every Python process started with this folder on PYTHONPATH.

It touches only the process of the stage named in REVISION_TEST_STAGE (``revision <stage>`` or
``python -m stages <stage>``, one per rank under ``accelerate launch``):
- REVISION_TEST_KILL_AFTER=N: the process SIGKILLs itself right after writing its N-th embedding shard
  (embed) or training checkpoint (pretrain, finetune), as a cluster killing the job would.
- REVISION_TEST_PARAMS_DIR=D: after training, each rank writes a digest of its trainable parameters to
  D/rank<N>.txt, so a test can check that all ranks hold the same weights.
"""

import os
import sys

STAGE = os.environ.get("REVISION_TEST_STAGE")


def _after(owner, name, action):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        action(args, result)
        return result

    setattr(owner, name, wrapper)


def _kill_after(owner, name, count):
    calls = []

    def maybe_kill(args, result):
        calls.append(1)
        if len(calls) >= count:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    _after(owner, name, maybe_kill)


def _record_params(folder):
    import hashlib

    import revision.train

    def write_digest(args, result):
        model = args[0]
        digest = hashlib.sha256()
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                digest.update(name.encode() + param.detach().cpu().numpy().tobytes())
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(folder, f"rank{rank}.txt"), "w") as out:
            out.write(digest.hexdigest())

    _after(revision.train, "train", write_digest)


def _install():
    kill_after = int(os.environ.get("REVISION_TEST_KILL_AFTER", "0"))
    if kill_after and STAGE == "embed":
        from revision.embedding_sets import EmbeddingWriter

        _kill_after(EmbeddingWriter, "_flush", kill_after)
    elif kill_after:
        import revision.train

        _kill_after(revision.train, "_checkpoint", kill_after)
    if os.environ.get("REVISION_TEST_PARAMS_DIR"):
        _record_params(os.environ["REVISION_TEST_PARAMS_DIR"])


if STAGE and sys.argv[1:2] == [STAGE] and os.path.basename(sys.argv[0]) in ("revision", "-m", "__main__.py"):
    _install()

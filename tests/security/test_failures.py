"""What a tenant reads when a worker fails names the problem, never the server's files or a
library's internals."""

from __future__ import annotations

import pickle

from app.core.errors import Invalid
from app.services.failures import public_message, strip_paths
from ml.data import DataError


def test_paths_are_cut_to_their_last_component() -> None:
    assert strip_paths("/srv/var/runs/ab12/pretext.pt: no parameter matches") == "pretext.pt: no parameter matches"
    assert strip_paths("digits.zip/train/3/x.png: corrupt image") == "digits.zip/train/3/x.png: corrupt image"
    assert strip_paths("at 1/2 scale (see /etc/)") == "at 1/2 scale (see (path))"


def test_out_of_memory_gets_advice_not_numbers() -> None:
    msg = public_message(MemoryError("Unable to allocate 909. TiB for an array with shape (10000000000000,)"))
    assert "TiB" not in msg and "ran out of memory" in msg and "batch_size" in msg
    assert "ran out of memory" in public_message(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))


def test_library_errors_are_named_by_type_only() -> None:
    msg = public_message(pickle.UnpicklingError("Weights only load failed ... torch.serialization.add_safe_globals"))
    assert msg == "internal error (UnpicklingError); the operators have the details in the worker log"
    assert "environ" not in public_message(OSError(2, "No such file or directory", "/proc/self/environ"))


def test_messages_written_for_users_pass_with_paths_stripped() -> None:
    assert (
        public_message(Invalid("pretext.backbone_weights: run x not found among your runs"))
        == "pretext.backbone_weights: run x not found among your runs"
    )
    assert public_message(DataError("/srv/uploads/ab/d.npz", "no 'images' array")) == "d.npz: no 'images' array"
    assert public_message(ValueError("/srv/runs/r/pretext.pt: shapes differ")) == "pretext.pt: shapes differ"
    assert len(public_message(ValueError("x" * 5000))) < 600

"""Where the tests find the Atari benchmark's expert action files (never committed)."""

import os
from pathlib import Path

import pytest

POLICIES_ENV_VAR = "AGENTSTATE_ATARI_POLICIES"
"""Same name as ``agentstate.envs.atari_preprocessing.POLICIES_ENV_VAR`` (asserted there)."""

SHARED_POLICIES = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "atari-prediction-benchmark"
) / "policies"


def expert_policies() -> Path:
    """The benchmark's action files: $AGENTSTATE_ATARI_POLICIES, else ../shared beside the repo.

    Skips the calling test when ale-py or opencv is missing, or the files are not there.
    """
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    folder = Path(os.environ.get(POLICIES_ENV_VAR, SHARED_POLICIES))
    if not (folder / "PongNoFrameskip-v4.txt").is_file():
        pytest.skip(
            f"expert action files not found in {folder}: set {POLICIES_ENV_VAR} or put "
            "shared/data/atari-prediction-benchmark/policies beside the repository"
        )
    return folder

import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""examples/python/passkey.py answers a shared 4,096-token prompt as longheads_llama2c does with
--policy recommended (the same five tokens), and its NumPy scorer answers it too. Skipped
without ../shared or the host (LONGHEADS_LLAMA2C)."""
import importlib.util
import os
import subprocess

import numpy as np
import pytest

SOURCE = os.environ.get("LONGHEADS_SOURCE", os.path.join(os.path.dirname(__file__), "..", ".."))
SHARED = os.path.join(SOURCE, "..", "shared")
MODEL = os.path.join(SHARED, "models", "passkey-256.bin")
PROMPT = os.path.join(SHARED, "data", "passkey", "L4096_s7.bin")


def load_example():
    spec = importlib.util.spec_from_file_location("passkey_example", os.path.join(SOURCE, "examples", "python", "passkey.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    if not os.path.exists(MODEL) or not os.path.exists(PROMPT):
        pytest.skip(f"{MODEL} or {PROMPT} is missing: the shared models and data sit beside the checkout")
    return load_example()


def test_the_numpy_host_answers_as_the_cpp_host(example):
    host = os.environ.get("LONGHEADS_LLAMA2C")
    if not host:
        pytest.skip("LONGHEADS_LLAMA2C (the longheads_llama2c host) is not set")
    expected = subprocess.run([host, "--model", MODEL, "--prompt", PROMPT, "--generate", "5", "--policy", "recommended", "--chunk-size", "32",
                               "--chunks", "8"], check=True, capture_output=True, text=True).stdout.split()
    model = example.Model(MODEL)
    prompt = np.fromfile(PROMPT, dtype=np.int32)
    answer = example.Transformer(model, example.make_attention(model, "recommended")).answer(prompt)
    assert [str(t) for t in answer] == expected[-5:]
    # The scorer written in NumPy (Quest's bound) finds the needle too.
    assert example.Transformer(model, example.make_attention(model, "python-bounds")).answer(prompt) == answer

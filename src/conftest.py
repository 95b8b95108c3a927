"""What the docstring examples in ``src/lowbit`` run on: real small objects, built offline once per session.

Every doctest runs in its own empty temporary working directory (files it writes land there) holding
links to these files:
  ``calib.txt`` / ``held_out.txt``  a few paragraphs of English (879 / 768 tokens of ``tok``)
  ``config.json``                 Llama-2-7B's config (what the size calculator reads; no weights)
  ``tiny-llama/``                 ``model`` and ``tok`` saved as a Hugging Face folder
  ``model.safetensors``           ``model``'s float weights, written by ``lowbit.save_tensors``
  ``model.gguf``                  ``model`` exported to GGUF as llama.cpp's Q4_K_M mix
  ``out/``                        ``qmodel`` saved by ``lowbit.save`` (``out/model.safetensors`` …)
and these names (the models are fresh copies in every doctest: change them freely):
  ``model``    a seeded random ``LlamaForCausalLM``: hidden 256, MLP 384, 2 layers, 4 heads (2 kv heads),
               vocabulary 300, untied head. Rows of 256 fill GGML's 256-blocks; ``mlp.down_proj``'s rows of
               384 do not, so llama.cpp's fallbacks show as they do on real models.
  ``tok``      its byte-level BPE tokenizer (300 tokens; ``<|im_start|>`` / ``<|im_end|>`` are bos / eos)
  ``windows``  calibration token windows ``(4, 32)`` (LongTensor) from ``calib.txt``
  ``qmodel``   ``lowbit.quantize(model, tok, "int4-g128", "gptq", calib=windows)``
  ``cnn``      a seeded random MobileNetV2 (``lowbit.model.vision``), eval mode
  ``images``   six seeded random images ``(6, 3, 64, 64)``
  ``qcnn``     ``lowbit.quantize(cnn, calib=images, scheme="int8", act="int8-static", method="rtn")``
  ``torch``, ``np``, ``os``, ``math``, ``Path``, ``transformers``, ``lowbit`` and lowbit's public names
  (``parse_scheme``, ``Scheme``, ``QTensor``, ``quantize_tensor``, ``Plan``, ``MethodConfig``, …)
Each doctest starts from ``torch.manual_seed(0)`` (the global RNG is restored after it), and
``$LOWBIT_CACHE`` points at a session folder, so no example writes into the user's cache.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

CALIB_TEXT = """\
The river leaves the mountains in a narrow gorge and spreads across the plain in three slow channels.
Farmers on both banks have measured its floods for two hundred years; the oldest stone marker stands
beside the mill, where the water reached 4.6 metres in the spring of 1843. Boats once carried grain,
timber and salt downstream to the port, and returned with cloth, iron tools and news from the capital.
When the railway arrived in 1871 the boats grew fewer, yet the bridges remained the centre of every town.

A bridge is a promise kept in stone. Its builders must know the weight it will carry, the force of the
current against its piers, and the way frost opens the smallest crack. The engineer of the long bridge
at Mirefield tested each arch with carts of gravel before she allowed a single coach to cross. Her
notebooks record the load, the deflection and the temperature of the morning, hour after hour.

Questions follow every flood. How high will the next one rise? Which fields should be left as meadow,
and which can be ploughed? The council publishes tables of rainfall, river levels and repairs, and
anyone may read them in the library: 312 pages for the year 1902 alone, with maps and careful drawings.
Children learn to swim in the summer shallows, and old men fish from the quay at dusk, counting the lamps.
"""

HELD_OUT_TEXT = """\
The market opens before dawn, when the first carts arrive from the farms along the river road. Traders
set out baskets of apples, onions and bread, and the smell of coffee drifts from the corner stall. By
seven the square is full: teachers on their way to the school, nurses leaving the night shift, and
children who should already be in class. The clock on the town hall has been five minutes slow since
the storm of 1911, and nobody has ever wanted it repaired.

In winter the stalls close early and the lamps are lit at four. The baker keeps a fire going behind his
counter, and the old ferryman tells the same story about the ice every year, a little longer each time.
Once, he says, the river froze so hard that a wedding party walked across it from the far bank, with a
fiddler in front and the bride's mother carrying the cake. The ice held; the cake, he admits, did not.

Visitors ask why the town never built a second bridge. The answer is in the council minutes of 1925: the
money was found, the plans were drawn, and then the engineers measured the river bed and found soft clay
where everyone had expected rock. The plans are still in the library, in a drawer marked "later".
"""

# Llama-2-7B's config.json (no weights): the size calculator's examples read it.
LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FRESH = ("model", "qmodel", "cnn", "qcnn")  # deep-copied for each doctest that names them
# lowbit's public names that no module defines differently (``load``, ``save``, ``quantize``, ``evaluate`` are
# left out: modules have their own functions of those names, which their examples mean)
PUBLIC = ("parse_scheme", "Scheme", "QTensor", "quantize_tensor", "save_tensors", "load_tensors", "Plan",
          "MethodConfig", "LowbitError")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([CALIB_TEXT, HELD_OUT_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def _model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def doctest_world(tmp_path_factory):
    """The shared objects and files (built once; doctests get copies of the models and links to the files)."""
    import json

    import transformers

    import lowbit
    from lowbit.io.gguf import export_gguf

    cache = tmp_path_factory.mktemp("lowbit-cache")
    files = tmp_path_factory.mktemp("doctest-files")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_CACHE", str(cache))
        tok = _tokenizer()
        model = _model(len(tok))
        windows = lowbit.calibration_windows(tok, CALIB_TEXT, 4, 32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            qmodel, _ = lowbit.quantize(model, tok, "int4-g128", "gptq", calib=windows, progress=False)
        (files / "calib.txt").write_text(CALIB_TEXT)
        (files / "held_out.txt").write_text(HELD_OUT_TEXT)
        (files / "config.json").write_text(json.dumps(LLAMA2_7B_CONFIG, indent=2))
        model.save_pretrained(files / "tiny-llama")
        tok.save_pretrained(files / "tiny-llama")
        lowbit.save_tensors(files / "model.safetensors", dict(model.state_dict()))
        export_gguf(model, tok, files / "model.gguf", "Q4_K_M", progress=False)
        lowbit.save(qmodel, files / "out", tokenizer=tok)
        from lowbit.model.vision import build_vision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            cnn = build_vision("mobilenet_v2")
            images = torch.randn(6, 3, 64, 64)
        qcnn, _ = lowbit.quantize(cnn, calib=images, scheme="int8", act="int8-static", method="rtn", progress=False)
    names = {n: getattr(lowbit, n) for n in PUBLIC}
    names.update(torch=torch, np=np, os=os, math=math, Path=Path, transformers=transformers, lowbit=lowbit,
                 model=model, tok=tok, windows=windows, qmodel=qmodel, cnn=cnn, images=images, qcnn=qcnn)
    return {"names": names, "files": files, "cache": cache}


@pytest.fixture(autouse=True)
def _doctest_setup(request, doctest_namespace, doctest_world, tmp_path, monkeypatch):
    """Each doctest: the names (fresh model copies), a working directory of its own, a seeded RNG."""
    source = "".join(e.source for e in getattr(getattr(request.node, "dtest", None), "examples", ()))
    for name, value in doctest_world["names"].items():
        fresh = name in FRESH and re.search(rf"\b{name}\b", source)
        doctest_namespace[name] = copy.deepcopy(value) if fresh else value
    for f in doctest_world["files"].iterdir():
        (tmp_path / f.name).symlink_to(f, target_is_directory=f.is_dir())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOWBIT_CACHE", str(doctest_world["cache"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield

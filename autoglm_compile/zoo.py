"""Models built in code with seeded random weights, for the demo, the tests and the benchmarks.

    python -m autoglm_compile.zoo resnet50 build/models/resnet50.onnx

Needs the 'zoo' extra (torch and transformers). Nothing is downloaded: configs only, weights are random.
"""
from __future__ import annotations

import argparse
from pathlib import Path

IR_VERSION = 8
OPSET = 17


def _export(module, args, names, outputs, path: Path, dynamic: dict | None = None) -> Path:
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module.eval(), args, str(path), input_names=names, output_names=outputs,
                          opset_version=OPSET, dynamo=False, dynamic_axes=dynamic)
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION  # onnx 1.23 writes 14; keep what every onnxruntime reads
    onnx.save(model, str(path))
    return path


def resnet50_module():
    """(module, example inputs) of transformers ResNetConfig() (ResNet-50), seeded: what resnet50() exports, and what
    the benchmarks run under PyTorch."""
    import torch
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    model = ResNetModel(ResNetConfig())

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).pooler_output

    return Wrap().eval(), (torch.randn(1, 3, 224, 224),)


def resnet50(path: Path) -> Path:
    """transformers ResNetConfig() (ResNet-50), batch dim dynamic."""
    module, args = resnet50_module()
    return _export(module, args, ["pixel_values"], ["pooled"], path, {"pixel_values": {0: "batch"}})


def mobilenet_v2(path: Path) -> Path:
    """transformers MobileNetV2Config(): its export pads dynamically, which TVM imports only after folding."""
    import torch
    from transformers import MobileNetV2Config, MobileNetV2Model

    torch.manual_seed(0)
    model = MobileNetV2Model(MobileNetV2Config())

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).pooler_output

    x = torch.randn(1, 3, 224, 224)
    return _export(Wrap(), (x,), ["pixel_values"], ["pooled"], path, {"pixel_values": {0: "batch"}})


def bert_module(seq: int = 128, **config):
    """(module, example inputs) of transformers BertConfig() (BERT-base unless overridden), seeded: what bert()
    exports, and what the benchmarks run under PyTorch."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(attn_implementation="eager", **config))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    ids = torch.randint(0, min(1000, model.config.vocab_size), (1, seq))
    return Wrap().eval(), (ids, torch.ones(1, seq, dtype=torch.long), torch.zeros(1, seq, dtype=torch.long))


def bert(path: Path, seq: int = 128, **config) -> Path:
    """transformers BertConfig() (BERT-base unless overridden), batch and sequence dims dynamic."""
    module, args = bert_module(seq, **config)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    return _export(module, args, names, ["last_hidden_state", "pooler_output"], path, {n: {0: "batch", 1: "sequence"} for n in names})


def bert_tiny(path: Path) -> Path:
    """A 2-layer, 128-wide BERT: the same graph structure as BERT-base, small enough for unit tests."""
    return bert(path, seq=16, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, vocab_size=1000)


def gpt2(path: Path, seq: int = 128, **config) -> Path:
    """transformers GPT2Config() (GPT-2 small, 124M, unless overridden): the decoder stack without the LM head and
    without a KV cache, causal attention, batch and sequence dims dynamic."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(attn_implementation="eager", use_cache=False, **config))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    names = ["input_ids", "attention_mask"]
    args = (torch.randint(0, min(1000, model.config.vocab_size), (1, seq)), torch.ones(1, seq, dtype=torch.long))
    return _export(Wrap(), args, names, ["last_hidden_state"], path, {n: {0: "batch", 1: "sequence"} for n in names})


def small_cnn():
    """A torch CNN factory (conv, batchnorm, residual, pooling, linear) for `module:factory` builds."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.block(x))
            return self.head(x.mean(dim=(2, 3)))

    return SmallCNN().eval()


MODELS = {"resnet50": resnet50, "mobilenet-v2": mobilenet_v2, "bert": bert, "bert-tiny": bert_tiny, "gpt2": gpt2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("output", type=Path)
    args = ap.parse_args()
    print(MODELS[args.model](args.output))


if __name__ == "__main__":
    main()

"""Write an F16 copy of a quantized GGUF, for llama.cpp side-by-side runs.

lightserve serves the embedded SmolLM2 GGUF (Q4_1) dequantized into bf16 safetensors. To compare
llama.cpp on the *same weights* without its int4 kernels, this script dequantizes every quantized
tensor of the GGUF into F16 and keeps everything else (metadata, tokenizer, F32 norms) as it is,
in GGUF's own layout, so no tensor reordering is involved.

    python benchmarks/gguf_to_f16.py SmolLM2-135M-Instruct.Q4_1.gguf SmolLM2-135M-Instruct.F16.gguf

The reader and writer are the `gguf` package's (a lightserve dependency).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, GGMLQuantizationType
from gguf.quants import dequantize

_KEEP_AS_IS = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    """Copy every key-value field except the ones the writer owns (architecture, file type)."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "general.file_type":
            writer.add_file_type(1)  # LLAMA_FTYPE_MOSTLY_F16
            continue
        value_type = field.types[0]
        if value_type == GGUFValueType.ARRAY:
            item_type = field.types[-1]
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=item_type)
        else:
            writer.add_key_value(field.name, field.contents(), value_type)


def convert(source: Path, destination: Path) -> None:
    reader = GGUFReader(source)
    architecture = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(destination, architecture)
    _copy_metadata(reader, writer)
    for tensor in reader.tensors:
        if tensor.tensor_type in _KEEP_AS_IS:
            data = np.asarray(tensor.data)
        else:
            data = dequantize(tensor.data, tensor.tensor_type).astype(np.float16)
        # GGUF lists dimensions innermost first; numpy wants them outermost first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        writer.add_tensor(tensor.name, data.reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a quantized GGUF")
    parser.add_argument("destination", type=Path, help="where to write the F16 GGUF")
    args = parser.parse_args()
    convert(args.source, args.destination)
    print(f"wrote {args.destination} ({args.destination.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()

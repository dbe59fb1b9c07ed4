from setuptools import find_packages, setup

setup(
    name="lightserve",
    version="0.1.0",
    description="A multi-process LLM serving system with TokenAttention KV cache and an Efficient Router",
    python_requires=">=3.10",
    packages=find_packages(include=["lightserve", "lightserve.*"]),
    package_data={"lightserve": ["backend/cpu_kernels/*.c", "backend/cpu_kernels/*.h"]},
    install_requires=[
        # torch is pinned by the README/.ci (install torch==2.13.0 first); a bare range here
        # never pulls a different build when a suitable torch is already installed.
        "torch>=2.3",
        "triton",
        "pyzmq",
        # The messages between processes (typed structs, msgpack on the wire).
        "msgspec",
        "rpyc",
        "transformers>=5.0",
        "tokenizers",
        # Chat templates: their errors are told apart from the server's own (httpserver/openai_api.py).
        "jinja2",
        "safetensors",
        "starlette",
        "uvicorn",
        "numpy",
        "prometheus_client",
        "pydantic>=2",
        "pillow",
        "tqdm",
        # Reading the embedded SmolLM2 GGUF (converted once into the local cache); transformers
        # refuses to load a GGUF without accelerate.
        "gguf",
        "accelerate",
        "psutil",
        # The serving benchmark client (python -m lightserve.benchmark).
        "httpx",
        # Structured output: JSON schema / regex / grammar to token masks (utils/grammar.py).
        "llguidance",
    ],
    entry_points={"console_scripts": ["lightserve = lightserve.cli:main"]},
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis", "schemathesis", "openai", "huggingface_hub", "matplotlib",
                 "jsonschema"],
        # PNG plots of the serving benchmark; the grammar library comparison
        # (benchmarks/grammar_mask_cost.py) and the structured-output benchmark.
        "bench": ["matplotlib", "xgrammar", "jsonschema"],
    },
)

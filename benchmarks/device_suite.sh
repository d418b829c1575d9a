#!/usr/bin/env bash
# One batched device session: install, GPU test suite, main-job demo, single-GPU benches.
#   bash benchmarks/device_suite.sh "install tests dist demo ops attn moe moell moeinter tp cp native tune tuneblock verify1 verify1b fp8loop verify2 tail exloss cublaslt final tail2"
#   (phases to run, in order; default "install tests demo ops attn"; on a multi-GPU kind start with
#   "install dist demo moe moell moeinter tp cp cpvarlen")
# Logs and JSON go under $OUT (default ./out). Safety variables are always set.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
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
    tuneblock) export TURBO_DIST_TRITON_TUNE=first  # blockwise FP8 variants (RESCALE_ACC etc.), forced configs only
            timeout 200 python benchmarks/tune_ops.py --cases fp8_grouped_block_G8_fc1 --rep-ms 20 --candidates \
              128x128x128x8x4,128x128x128x8x4x2,128x256x128x8x3x2,128x256x128x8x4x2,256x128x128x8x3x2 \
              --json "$OUT/tune_grouped_block_$TAG.json" > "$OUT/tune_grouped_block_$TAG.log" 2>&1; echo "tuneblock grouped rc=$?"
            tail -14 "$OUT/tune_grouped_block_$TAG.log"
            timeout 200 python benchmarks/tune_ops.py --cases fp8_block_8192 --rep-ms 20 --candidates \
              128x128x128x8x8x4,128x128x128x8x8x4x4,128x256x128x8x8x3x4,256x128x128x8x8x3x4,128x256x128x8x8x3x5 \
              --json "$OUT/tune_block_$TAG.json" > "$OUT/tune_block_$TAG.log" 2>&1; echo "tuneblock dense rc=$?"
            tail -14 "$OUT/tune_block_$TAG.log"; unset TURBO_DIST_TRITON_TUNE;;
    verify1) export TURBO_DIST_TRITON_TUNE=first  # one GPU: what earlier sessions left unverified (see README Status)
            timeout 240 python -m pytest -q -rs -p no:cacheprovider tests/test_moe_low_latency.py -k cuda_graph \
              tests/test_varlen_attention.py > "$OUT/pytest_verify1_$TAG.log" 2>&1; echo "verify1 tests rc=$?"
            tail -4 "$OUT/pytest_verify1_$TAG.log"
            TURBO_DIST_TEST_SHARE_GPU=1 TURBO_DIST_TIMEOUT_S=30 TURBO_DIST_TEST_TIMEOUT_S=100 timeout 300 python -m pytest \
              --dist-only -v -rs -p no:cacheprovider tests/test_moe_low_latency.py tests/test_varlen_attention.py \
              tests/test_cp.py > "$OUT/pytest_share_ll_cp_$TAG.log" 2>&1
            echo "verify1 share-GPU low-latency + CP rc=$?"; grep -cE "PASSED" "$OUT/pytest_share_ll_cp_$TAG.log"
            grep -E "FAILED|ERROR" "$OUT/pytest_share_ll_cp_$TAG.log" | head -10; unset TURBO_DIST_TRITON_TUNE;;
    verify1b) timeout 200 python benchmarks/bench_moe.py --mode low-latency --json "$OUT/moe_low_latency_$TAG.json" \
              > "$OUT/moe_ll_$TAG.log" 2>&1; echo "verify1 LL bench (self-loop) rc=$?"; tail -8 "$OUT/moe_ll_$TAG.log"
            timeout 150 python benchmarks/bench_varlen_attention.py --json "$OUT/varlen_attention_$TAG.json" \
              > "$OUT/varlen_$TAG.log" 2>&1; echo "verify1 varlen bench rc=$?"; tail -6 "$OUT/varlen_$TAG.log"
            timeout 300 python benchmarks/bench_ops.py --sections grouped --json "$OUT/ops_grouped_$TAG.json" \
              > "$OUT/ops_grouped_$TAG.log" 2>&1; echo "verify1 grouped bench rc=$?";;
    fp8loop) export TURBO_DIST_TRITON_TUNE=first  # BLOCKWISE grouped on cuBLASLt per group (torch_loop)
            python -c "import torch, logging; from turbo_dist.ops import fp8_grouped as fp8; print('cuBLASLt blockwise row alignment:', fp8._cublas_block_row_align(torch.device('cuda', 0)), fp8._PROBES)" 2>&1 | tail -2
            timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_fp8.py -k "torch_loop or grouped" tests/test_dispatcher.py \
              > "$OUT/pytest_fp8loop_$TAG.log" 2>&1; echo "fp8loop tests rc=$?"; tail -4 "$OUT/pytest_fp8loop_$TAG.log"
            timeout 240 python benchmarks/bench_ops.py --sections fp8_grouped --json "$OUT/ops_fp8_grouped_$TAG.json" \
              > "$OUT/ops_fp8_grouped_$TAG.log" 2>&1; echo "fp8loop bench rc=$?"; grep -E "BLOCKWISE|G8_fc1 |G32_fc1 " "$OUT/ops_fp8_grouped_$TAG.log" | head -30
            timeout 120 python benchmarks/probe_fp8_grouped_host.py --json "$OUT/probe_fp8_grouped_host_$TAG.json" 2>&1 | tail -6
            unset TURBO_DIST_TRITON_TUNE;;
    verify2) # one GPU: the CP packed-plan refactor (share-GPU multi-process) and the FP8 MoE example
            TURBO_DIST_TRITON_TUNE=first TURBO_DIST_TEST_SHARE_GPU=1 TURBO_DIST_TIMEOUT_S=30 TURBO_DIST_TEST_TIMEOUT_S=100 \
              timeout 300 python -m pytest --dist-only -q -rs -p no:cacheprovider tests/test_varlen_attention.py tests/test_cp.py \
              > "$OUT/pytest_share_cp_$TAG.log" 2>&1; echo "verify2 share-GPU CP rc=$?"; tail -3 "$OUT/pytest_share_cp_$TAG.log"
            grep -E "FAILED|ERROR" "$OUT/pytest_share_cp_$TAG.log" | head -10
            timeout 200 torchrun --standalone --nproc-per-node 1 examples/moe_layer.py --tokens 4096 --hidden 7168 --ffn 2048 \
              --experts 4 --topk 2 --fp8 blockwise --steps 4 > "$OUT/example_fp8_$TAG.log" 2>&1; echo "verify2 example rc=$?"
            tail -8 "$OUT/example_fp8_$TAG.log";;
    tail) # the split-tail-wave GEMM kernel: GPU tests, the gemm bench section, forced configs on 8192 x 2112 x 7168
            TURBO_DIST_TRITON_TUNE=first timeout 150 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_gemm.py -k gpu \
              > "$OUT/pytest_gemm_$TAG.log" 2>&1; echo "tail tests rc=$?"; tail -3 "$OUT/pytest_gemm_$TAG.log"
            grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest_gemm_$TAG.log" | head -8
            timeout 280 python benchmarks/bench_ops.py --sections gemm ${GEMM_QUICK:+--quick} --json "$OUT/ops_gemm_$TAG.json" > "$OUT/ops_gemm_$TAG.log" 2>&1
            echo "tail bench rc=$?"; grep -E "^ *gemm" "$OUT/ops_gemm_$TAG.log" | grep -E "cublas|triton |no_split|default" | head -40
            timeout 100 python benchmarks/tune_ops.py --cases dsv3_qkv_a --rep-ms 20 --candidates \
              256x128x64x16x8x4,256x128x64x16x8x4x8,128x256x64x8x8x4x8,128x256x64x8x8x3x8,128x128x64x8x8x4x8,128x256x64x8x8x4x1 \
              --json "$OUT/tune_tail_$TAG.json" > "$OUT/tune_tail_$TAG.log" 2>&1; echo "tail tune rc=$?"; tail -12 "$OUT/tune_tail_$TAG.log";;
    exloss) # examples/moe_layer.py loss with and without FP8 (same seed): is a rising loss the learning rate or FP8?
            for f in "" "--fp8 blockwise"; do timeout 90 torchrun --standalone --nproc-per-node 1 examples/moe_layer.py --tokens 4096 \
              --hidden 7168 --ffn 2048 --experts 4 --topk 2 $f --steps 6 2>&1 | grep -E "step|world" | tail -8; done;;
    cublaslt) # BLOCKWISE FP8 grouped GEMM on cuBLASLt with the loop in C++ (turbo_dist._cublaslt)
            python -c "from turbo_dist.ops import fp8_grouped as f; m = f.native_module(); print('native cublaslt:', m and m.version(), f._NATIVE.get('why'))" 2>&1 | tail -2
            TURBO_DIST_TRITON_TUNE=first timeout 150 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_fp8.py \
              -k "cublaslt or torch_loop or grouped or m_major" > "$OUT/pytest_cublaslt_$TAG.log" 2>&1; echo "cublaslt tests rc=$?"
            tail -3 "$OUT/pytest_cublaslt_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_cublaslt_$TAG.log" | head -10
            timeout 240 python benchmarks/bench_ops.py --sections fp8_grouped --json "$OUT/ops_fp8_grouped_$TAG.json" \
              > "$OUT/ops_fp8_grouped_$TAG.log" 2>&1; echo "cublaslt bench rc=$?"; grep -E "host" "$OUT/ops_fp8_grouped_$TAG.log" | head -14
            timeout 180 python benchmarks/probe_fp8_grouped_host.py --tokens-per-expert 1024,256,128 \
              --json "$OUT/probe_fp8_grouped_host_$TAG.json" 2>&1 | tail -20;;
    final) # GPU tests of the GEMM tuner / split tail / cublaslt, then the whole gemm bench section
            TURBO_DIST_TRITON_TUNE=first timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_gemm.py \
              tests/test_tuner.py tests/test_ops_fp8.py -k "gpu or cublaslt or torch_loop or pick" > "$OUT/pytest_final_$TAG.log" 2>&1
            echo "final tests rc=$?"; tail -2 "$OUT/pytest_final_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_final_$TAG.log" | head -8
            timeout 330 python benchmarks/bench_ops.py --sections gemm --json "$OUT/ops_gemm_$TAG.json" > "$OUT/ops_gemm_$TAG.log" 2>&1
            echo "final gemm bench rc=$?"; grep -E "^ *gemm" "$OUT/ops_gemm_$TAG.log" | grep -vE "triton_ptr" | head -40;;
    tail2) # split tail as one persistent kernel or as a second launch: dsv3_qkv_a
            TURBO_DIST_TRITON_TUNE=first timeout 150 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_gemm.py \
              tests/test_ops_fp8.py -k "gpu or cublaslt or torch_loop" > "$OUT/pytest_tail2_$TAG.log" 2>&1; echo "tail2 tests rc=$?"
            tail -2 "$OUT/pytest_tail2_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_tail2_$TAG.log" | head -8
            timeout 200 python benchmarks/bench_ops.py --sections gemm --quick --json "$OUT/ops_gemm_$TAG.json" > "$OUT/ops_gemm_$TAG.log" 2>&1
            echo "tail2 bench rc=$?"; grep -E "^ *gemm" "$OUT/ops_gemm_$TAG.log" | grep -vE "triton_ptr" | head -20
            timeout 100 python benchmarks/tune_ops.py --cases dsv3_qkv_a --rep-ms 20 --candidates \
              256x128x64x16x8x4,256x128x64x16x8x4x8,256x128x64x16x8x4x16,128x256x64x8x8x4x16,128x256x64x8x8x3x16,128x128x64x8x8x4x16 \
              --json "$OUT/tune_tail_$TAG.json" > "$OUT/tune_tail_$TAG.log" 2>&1; echo "tail2 tune rc=$?"; grep -E "config|baseline|autotuned" "$OUT/tune_tail_$TAG.log" | tail -10;;
    verify3) # one GPU: stop 14's last commits (tuner device guard / L2-sized flush, BLOCK_K check, C++ row check,
            # CP return_lse in share-GPU mode), then the quick gemm bench
            TURBO_DIST_TRITON_TUNE=first timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_gemm.py \
              tests/test_tuner.py tests/test_ops_fp8.py -k "gpu or cublaslt or torch_loop or pick" > "$OUT/pytest_verify3_$TAG.log" 2>&1
            echo "verify3 tests rc=$?"; tail -2 "$OUT/pytest_verify3_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_verify3_$TAG.log" | head -8
            TURBO_DIST_TRITON_TUNE=first TURBO_DIST_TEST_SHARE_GPU=1 TURBO_DIST_TIMEOUT_S=30 TURBO_DIST_TEST_TIMEOUT_S=100 \
              timeout 300 python -m pytest --dist-only -q -rs -p no:cacheprovider tests/test_varlen_attention.py tests/test_cp.py \
              > "$OUT/pytest_share_cp_$TAG.log" 2>&1; echo "verify3 share-GPU CP rc=$?"; tail -2 "$OUT/pytest_share_cp_$TAG.log"
            grep -E "^(FAILED|ERROR)" "$OUT/pytest_share_cp_$TAG.log" | head -10;;
    tuner2) # one GPU: grouped / pointer GEMM on kernels/_tuner (capture test), dispatcher host overhead, grouped bench
            TURBO_DIST_TRITON_TUNE=first timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_gemm.py \
              tests/test_tuner.py tests/test_ops_fp8.py -k "gpu or cublaslt or torch_loop or pick or capture or test_dispatcher" tests/test_dispatcher.py \
              > "$OUT/pytest_tuner2_$TAG.log" 2>&1; echo "tuner2 tests rc=$?"; tail -2 "$OUT/pytest_tuner2_$TAG.log"
            grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_tuner2_$TAG.log" | head -8
            timeout 360 python benchmarks/bench_ops.py --sections overhead,grouped --json "$OUT/ops_grouped_$TAG.json" \
              > "$OUT/ops_grouped_$TAG.log" 2>&1; echo "tuner2 bench rc=$?"; grep -A6 "## overhead" "$OUT/ops_grouped_$TAG.log"
            grep -E "^ *grouped" "$OUT/ops_grouped_$TAG.log" | grep -E "default|triton" | head -40;;
    prof) # one GPU: host time per layer of a small GEMM call; LL zero-copy combine; FP8 weight cache (tests, bench)
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
    prof2) # one GPU: the trimmed grouped launch (lens summed in the kernel, cached SM version) and the FLOP floor
            TURBO_DIST_TRITON_TUNE=first timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_gemm.py \
              tests/test_ops_fp8.py tests/test_dispatcher.py -k "gpu or test_dispatcher" > "$OUT/pytest_prof2_$TAG.log" 2>&1
            echo "prof2 tests rc=$?"; tail -2 "$OUT/pytest_prof2_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_prof2_$TAG.log" | head -8
            timeout 150 python benchmarks/probe_host_overhead.py --json "$OUT/probe_host_overhead_$TAG.json" > "$OUT/probe_host_$TAG.log" 2>&1
            echo "prof2 probe rc=$?"; head -16 "$OUT/probe_host_$TAG.log"
            timeout 240 python benchmarks/bench_ops.py --quick --sections overhead,grouped --json "$OUT/ops_grouped_quick_$TAG.json" \
              > "$OUT/ops_grouped_quick_$TAG.log" 2>&1; echo "prof2 bench rc=$?"; grep -A6 "## overhead" "$OUT/ops_grouped_quick_$TAG.log"
            grep -E "^ *grouped" "$OUT/ops_grouped_quick_$TAG.log" | grep -E "fwd" | head -24;;
    gputests) # one GPU: every GPU-marked test (first config only), a regression sweep after a session's changes
            TURBO_DIST_TRITON_TUNE=first timeout ${GPUTESTS_S:-400} python -m pytest tests/ -q -rs -p no:cacheprovider \
              -k "gpu or self_loop or cuda_graph" > "$OUT/pytest_gpu_$TAG.log" 2>&1; echo "gputests rc=$?"
            tail -2 "$OUT/pytest_gpu_$TAG.log"; grep -E "^(FAILED|ERROR)|Error:" "$OUT/pytest_gpu_$TAG.log" | head -12;;
    moefix) timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_moe_low_latency.py::test_low_latency_triton_self_loop \
              tests/test_moe_low_latency.py::test_low_latency_kernels_simulated_ranks tests/test_moe_low_latency.py::test_fp8_casts_bit_identical_on_cpu_and_gpu \
              tests/test_moe_nvlink.py::test_nvlink_vs_collective "tests/test_moe_nvlink.py::test_nvlink_reference_fp8_backward_errors" tests/test_moe.py > "$OUT/pytest_moefix_$TAG.log" 2>&1; echo "moefix rc=$?"; tail -4 "$OUT/pytest_moefix_$TAG.log";;
    opstests) TURBO_DIST_TRITON_TUNE=first timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/test_ops_gemm.py tests/test_ops_fp8.py > "$OUT/pytest_ops_$TAG.log" 2>&1; echo "opstests rc=$?"; tail -3 "$OUT/pytest_ops_$TAG.log";;
    *) echo "unknown phase $ph";;
  esac
  echo "phase $ph took $(( $(date +%s) - t0 )) s"
done 2>&1 | tee -a "$OUT/suite.log"

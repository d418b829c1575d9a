"""Config (DeepEP's tuning record) and the dispatch handle."""


class Config:
    """Performance tuning of the high-throughput kernels, DeepEP's `Config` signature.

    num_sms: programs (thread blocks) the nvlink kernels run on (one per "channel").
    num_max_nvl_chunked_send_tokens / num_max_nvl_chunked_recv_tokens: DeepEP's ring-buffer chunking.
    Our nvlink transport writes whole batches into the receiver's buffer (no ring), so these two are
    validated as in DeepEP but only `num_max_nvl_chunked_send_tokens` is used: tokens a program
    handles between flag updates. num_max_rdma_*: validated as in DeepEP, unused (the `hierarchical`
    transport moves whole batches with collectives on the rail and node subgroups, no RDMA ring).
    """

    def __init__(self, num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
                 num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=128):
        for name, v in (("num_sms", num_sms), ("num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens),
                        ("num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens),
                        ("num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens),
                        ("num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens)):
            if not isinstance(v, int):
                raise TypeError(f"Config.{name} must be an int, got {type(v).__name__}")
        if num_sms < 0:
            raise ValueError(f"Config.num_sms must be >= 0, got {num_sms}")
        if not 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "Config needs 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, got "
                f"{num_max_nvl_chunked_send_tokens} and {num_max_nvl_chunked_recv_tokens}"
            )
        if num_max_rdma_chunked_send_tokens <= 0 or num_max_rdma_chunked_recv_tokens <= 0:
            raise ValueError("Config rdma chunk sizes must be positive")
        rdma_recv = -(-num_max_rdma_chunked_recv_tokens // num_max_rdma_chunked_send_tokens) * \
            num_max_rdma_chunked_send_tokens
        if num_max_rdma_chunked_send_tokens > rdma_recv // 2:
            raise ValueError("Config needs num_max_rdma_chunked_send_tokens <= num_max_rdma_chunked_recv_tokens / 2")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes, num_ranks):
        """DeepEP's hint (bytes for its ring buffers). Our nvlink transport sizes by token count instead:
        use `Buffer.get_nvl_buffer_size_hint(num_max_tokens_per_rank, hidden, ...)` for a size that fits."""
        channels = max(self.num_sms // 2, 1)
        ranks = min(num_ranks, 8)
        slots = channels * ranks * self.num_max_nvl_chunked_recv_tokens
        n = channels * ranks * 3 * 4 + slots * (hidden_bytes + 128 * 8 + 128 * 4 + 128 * 4)
        return (n + 127) // 128 * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes, num_ranks):
        """DeepEP's rule: 0 up to 8 ranks (one NVLink domain), else the bytes of its RDMA ring buffers. Our
        `hierarchical` transport allocates nothing from it (on more than one node it is picked whatever
        num_rdma_bytes says); the value keeps DeepEP's sizing code meaningful."""
        if num_ranks <= 8:
            return 0
        channels = max(self.num_sms // 2, 1)
        rdma_ranks = (num_ranks + 7) // 8
        per_token = hidden_bytes + 128 * 8 + 128 * 4 + 128 * 4  # row, top-k, scales, metadata (DeepEP's bound)
        n = channels * rdma_ranks * self.num_max_rdma_chunked_recv_tokens * per_token * 2  # send + recv halves
        return (n + 127) // 128 * 128

    def __repr__(self):
        return (f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens}, "
                f"num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens})")


class DispatchHandle(tuple):
    """What `dispatch` returns for `combine` and cached dispatch.

    A 6-tuple laid out like DeepEP's intranode handle, so code indexing it keeps working:
      [0] rank_prefix_matrix [num_ranks, num_ranks] int32: rows [0..i]'s token counts to rank j, summed;
          tokens from rank i arrive at rank j in rows [rpm[i-1][j], rpm[i][j]).
      [1] num_tokens_matrix [num_ranks, num_ranks] int32: tokens rank i sends to rank j (DeepEP: channel prefix).
      [2] send_offsets [num_ranks] int32: where this rank's block for rank j starts in its send order.
      [3] recv_src_idx [num_recv_tokens] int32: index of each received token on its source rank.
      [4] is_token_in_rank [num_tokens, num_ranks] bool.
      [5] send_head [num_tokens, num_ranks] int32: a token's row inside its block at each rank, -1 if not sent.
    Attributes (host side): num_recv_tokens (int, the valid received rows), num_worst_tokens (int, 0 when
    outputs are exact-sized), send_counts/recv_counts (lists, the collective transport's splits),
    max_recv_tokens/max_send_tokens (largest over ranks, for buffer checks), transport (str).
    """

    def __new__(cls, fields, **attrs):
        obj = super().__new__(cls, fields)
        if len(obj) != 6:
            raise ValueError("DispatchHandle holds exactly 6 fields")
        obj.__dict__.update(attrs)
        return obj

    @property
    def rank_prefix_matrix(self):
        return self[0]

    @property
    def num_tokens_matrix(self):
        return self[1]

    @property
    def send_offsets(self):
        return self[2]

    @property
    def recv_src_idx(self):
        return self[3]

    @property
    def is_token_in_rank(self):
        return self[4]

    @property
    def send_head(self):
        return self[5]

    def __reduce__(self):  # keep pickling (e.g. torch.save of a handle) working with the attributes
        return (_rebuild_handle, (tuple(self), dict(self.__dict__)))


def _rebuild_handle(fields, attrs):
    return DispatchHandle(fields, **attrs)

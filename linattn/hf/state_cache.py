"""LinearStateCache: a transformers Cache whose layers keep the recurrent state (S, z) of linear
attention (or Performer's, over its random features) instead of keys and values."""
import functools

from ..nn.decoding import map_tensors


@functools.cache  # one class, made on first use (transformers is imported only then)
def _state_layer_class():
    from transformers.cache_utils import CacheLayerMixin

    class LinearStateLayer(CacheLayerMixin):
        """One layer's recurrent state (S, z) in place of its keys and values."""

        is_sliding = False

        def __init__(self, **kwargs):
            super().__init__()
            self.state = None
            self.seen = 0

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            # The attention function finds this layer through the tensors it is handed.
            key_states = key_states.view_as(key_states)
            key_states._linattn_state_layer = self
            return key_states, value_states

        def attend(self, run):
            """run(initial_state=, output_final_state=True) -> (out, state) over the new tokens."""
            out, self.state = run(initial_state=self.state, output_final_state=True)
            self.seen += out.shape[2]
            return out

        def get_mask_sizes(self, query_length: int):
            return self.seen + query_length, 0

        def get_seq_length(self) -> int:
            return self.seen

        def get_max_length(self) -> int:
            return -1

        def offload(self):
            pass

        def prefetch(self):
            pass

        def reset(self) -> None:
            self.state, self.seen = None, 0

        def reorder_cache(self, beam_idx) -> None:
            # linear attention's (S, z), the delta rule's S, a linearized hybrid's dict of tensors
            self.state = map_tensors(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    return LinearStateLayer


def LinearStateCache():  # noqa: N802  (a factory that reads like the class it returns)
    """A transformers Cache holding each layer's linear-attention state instead of its keys and
    values: pass it as `past_key_values=` to `model(...)` or `model.generate(...)` of a model
    running attn_implementation="linattn_linear" (or _relu, or linattn_performer)."""
    from transformers.cache_utils import Cache

    return Cache(layer_class_to_replicate=_state_layer_class())

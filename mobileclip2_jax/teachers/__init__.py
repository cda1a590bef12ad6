"""Teachers for reinforced-dataset generation: zoo models (JAX) and open_clip models (PyTorch).

Every teacher exposes the same small interface (:class:`base.TeacherModel`) so that
:mod:`mobileclip2_jax.data.reinforce` never imports a model library: it hands a teacher
replayed views and caption strings and gets L2-normalized float32 embeddings back.
"""

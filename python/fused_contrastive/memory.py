"""A cross-batch memory (XBM, Wang et al., CVPR 2020) for the in-batch loss: the
last embeddings seen in training, with their labels, used as references."""

import tensorflow as tf

from fused_contrastive._inputs import Partners, gatherable_labels


class CrossBatchMemory(tf.Module):
    """A ring buffer of the last `size` embeddings (held without gradient) and
    their class labels.

    `InBatchContrastiveLoss(memory_size=M)` owns one (`loss.memory`): while a
    tape records (training), each call pairs the batch's anchors with the rows
    the memory holds, then enqueues the batch, every replica's when a
    strategy runs several (so that all replicas hold the same rows in the
    same order). Until it is full only the filled rows count. For the first
    `warmup_steps` training steps the memory is filled but not used.

    Its variables (made at the first call, when the embedding size is known)
    are a `tf.Module`'s: save and restore them with the model's checkpoint,
    e.g. `tf.train.Checkpoint(model=model, optimizer=model.optimizer,
    memory=loss.memory)`, restoring before the first call (the values are
    then assigned as the variables are made) or after it. Keras' `.keras`
    files keep the loss's config (`memory_size`, `memory_warmup_steps`), not
    the rows.
    """

    def __init__(self, size, warmup_steps=0, name="cross_batch_memory"):
        super().__init__(name=name)
        self.size = size
        self.warmup_steps = warmup_steps
        self.embeddings = self.labels = None

    @property
    def built(self):
        return self.embeddings is not None

    def _build(self, dim, dtype, label_dtype):
        # Made outside any function being traced, and as the strategy's
        # mirrored variables, written by the first replica (each replica
        # writes the same global batch).
        def make(strategy=None):
            with tf.init_scope(), tf.name_scope(self.name):
                variable = lambda value, name: tf.Variable(  # noqa: E731
                    value,
                    trainable=False,
                    name=name,
                    synchronization=tf.VariableSynchronization.ON_WRITE,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                )
                self.embeddings = variable(tf.zeros([self.size, dim], dtype), "embeddings")
                self.labels = variable(tf.zeros([self.size], label_dtype), "labels")
                self.filled = variable(tf.constant(0, tf.int64), "filled")
                self.head = variable(tf.constant(0, tf.int64), "head")
                self.steps = variable(tf.constant(0, tf.int64), "steps")

        context = tf.distribute.get_replica_context()
        if context is not None and tf.distribute.has_strategy():
            context.merge_call(make)
        else:
            make()

    def references(self, labels, embeddings):
        """The rows to pair the batch's anchors with, as Partners without
        gradient: those filled so far, none during the warm-up."""
        if not self.built:
            self._build(
                embeddings.shape[-1], embeddings.dtype, gatherable_labels(labels, None).dtype
            )
        used = tf.where(self.steps < self.warmup_steps, tf.constant(0, tf.int64), self.filled)
        return Partners(
            self.labels.read_value(),
            tf.cast(self.embeddings.read_value(), embeddings.dtype),
            used,
            gradient=False,
        )

    def enqueue(self, labels, embeddings):
        """Writes the batch (labels [G], embeddings [G, D], the global batch
        when gathered) after the rows held, its last `size` rows when it has
        more, and counts a training step."""
        e = tf.cast(tf.stop_gradient(embeddings), self.embeddings.dtype)
        labels = tf.cast(labels, self.labels.dtype)
        rows = tf.shape(e, out_type=tf.int64)[0]
        count = tf.minimum(rows, self.size)
        keep = tf.range(rows - count, rows)
        positions = tf.math.floormod(self.head + tf.range(count), self.size)
        # In place: a copy of the whole memory per step would cost more than
        # the rows written (mirrored variables take scatter_update, not the
        # scatter_nd_* forms).
        self.embeddings.scatter_update(tf.IndexedSlices(tf.gather(e, keep), positions))
        self.labels.scatter_update(tf.IndexedSlices(tf.gather(labels, keep), positions))
        self.head.assign(tf.math.floormod(self.head + count, self.size))
        self.filled.assign(tf.minimum(self.filled + count, self.size))
        self.steps.assign_add(1)

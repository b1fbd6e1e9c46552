"""The run configuration form: model, parallelism, batch, sequence, micro-batches, ...

Memory knobs sit at the end: optimizer, activation checkpointing, DP gradient
accumulation and precision.  DP's per-device batch shares are the planner's (or the
CLI's ``--dp-shares``): the form only shows them.

The form keeps no settings of its own beyond its widgets: :meth:`settings` reads them into
a :class:`workers.config.RunSettings`, :meth:`set_settings` writes one back, and
``settings_changed`` fires on every edit (the planner debounces).
"""
from __future__ import annotations

from dataclasses import replace

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from workers.config import OPTIMIZERS, PRECISIONS, Parallelism, RunSettings, Schedule
from workers.presets import PRESETS

LOCAL_WEIGHTS = "Local weights…"


def _spin(lo: int, hi: int, value: int, parent: QWidget) -> QSpinBox:
    s = QSpinBox(parent)
    s.setRange(lo, hi)
    s.setValue(value)
    s.setAccelerated(True)
    return s


class QtRunConfigPanel(QWidget):
    """Run settings form; emits ``settings_changed()`` on any edit."""

    settings_changed = Signal()

    def __init__(self, settings: RunSettings | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = QComboBox(self)
        self.model.addItems(list(PRESETS) + [LOCAL_WEIGHTS])
        self.weights = QLineEdit(self)
        self.weights.setPlaceholderText("Hugging Face model directory on the devices")
        browse_w = QPushButton("…", self)
        browse_w.setFixedWidth(28)
        browse_w.clicked.connect(lambda: self._browse_dir(self.weights))
        self.parallelism = QComboBox(self)
        for par in Parallelism:
            self.parallelism.addItem(par.label, par.value)
        d = RunSettings()
        self.steps = _spin(1, 10_000_000, d.steps, self)
        self.batch_size = _spin(1, 65536, d.batch_size, self)
        self.seq_len = _spin(2, 8192, d.seq_len, self)
        self.micro_batches = _spin(1, 1024, d.micro_batches, self)
        self.sync_every = _spin(1, 10000, d.sync_every, self)
        self.checkpoint_every = _spin(0, 10_000_000, d.checkpoint_every, self)
        self.checkpoint_every.setSpecialValueText("at the end only")
        self.checkpoint_every.setToolTip("A sharded checkpoint every N steps (also every "
                                         f"{d.checkpoint_minutes:g} min, at Stop and at the end)")
        self.eval_every = _spin(0, 10_000_000, d.eval_every, self)
        self.eval_every.setSpecialValueText("at the end only")
        self.eval_every.setToolTip("Held-out loss and accuracy every N steps and at the end")
        self.schedule = QComboBox(self)
        self.schedule.addItems([sch.value for sch in Schedule])
        self.mode = QComboBox(self)
        self.mode.addItem("CPU", "cpu")
        self.mode.addItem("GPU (CUDA)", "cuda")
        self.lr = QDoubleSpinBox(self)
        self.lr.setDecimals(6)
        self.lr.setRange(0.0, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setSpecialValueText("auto (by model)")  # 0 stands for None: the worker's default
        self.dataset = QLineEdit(self)
        self.dataset.setPlaceholderText("QNLI-format TSV on the devices (empty: generated data)")
        browse_d = QPushButton("…", self)
        browse_d.setFixedWidth(28)
        browse_d.clicked.connect(self._browse_file)
        self.optimizer = QComboBox(self)
        self.optimizer.addItems(list(OPTIMIZERS))
        self.optimizer.setToolTip("adamw: two moments per parameter; sgd: one momentum buffer; "
                                  "adafactor: factored second moment (least memory)")
        self.activation_checkpointing = QCheckBox("recompute activations in backward", self)
        self.activation_checkpointing.setToolTip("Less activation memory, about a third more compute")
        self.grad_accumulation = _spin(1, 4096, d.grad_accumulation, self)
        self.grad_accumulation.setToolTip("DP: each replica runs its slice in this many micro-batches")
        self.precision = QComboBox(self)
        self.precision.addItems(list(PRECISIONS))
        self.precision.setToolTip("bf16: autocast the forward where the device supports it")
        self.dp_mode = QComboBox(self)
        self.dp_mode.addItem("gradients every k steps (DDP)", "ddp")
        self.dp_mode.addItem("low-bandwidth: DiLoCo", "diloco")
        self.dp_mode.setToolTip("DiLoCo: each replica takes k optimizer steps alone, then their moves are "
                                "averaged in one bf16 all-reduce and an outer Nesterov step (slow links)")
        self.dp_shares = QLabel(self)
        self.dp_shares.setToolTip("DP: each device's share of the batch, in rank order; set by the "
                                  "planner or --dp-shares")
        form = QFormLayout(self)
        form.setContentsMargins(4, 4, 4, 4)
        form.addRow("Model", self.model)
        form.addRow("Weights", self._row(self.weights, browse_w))
        form.addRow("Parallelism", self.parallelism)
        form.addRow("Steps", self.steps)
        form.addRow("Batch size", self.batch_size)
        form.addRow("Sequence length", self.seq_len)
        form.addRow("Micro-batches", self.micro_batches)
        form.addRow("Sync every k steps", self.sync_every)
        form.addRow("DP sync", self.dp_mode)
        form.addRow("PP schedule", self.schedule)
        form.addRow("Mode", self.mode)
        form.addRow("Learning rate", self.lr)
        form.addRow("Dataset", self._row(self.dataset, browse_d))
        form.addRow("Checkpoint every", self.checkpoint_every)
        form.addRow("Evaluate every", self.eval_every)
        form.addRow("Optimizer", self.optimizer)
        form.addRow("Activation checkpointing", self.activation_checkpointing)
        form.addRow("Gradient accumulation", self.grad_accumulation)
        form.addRow("Precision", self.precision)
        form.addRow("DP batch shares", self.dp_shares)
        self._base = RunSettings()
        self.set_settings(settings or RunSettings())
        for sig in (self.model.currentIndexChanged, self.parallelism.currentIndexChanged,
                    self.schedule.currentIndexChanged, self.mode.currentIndexChanged,
                    self.optimizer.currentIndexChanged, self.precision.currentIndexChanged,
                    self.dp_mode.currentIndexChanged,
                    self.activation_checkpointing.toggled):
            sig.connect(self._changed)
        for spin in (self.steps, self.batch_size, self.seq_len, self.micro_batches, self.sync_every,
                     self.checkpoint_every, self.eval_every, self.grad_accumulation):
            spin.valueChanged.connect(self._changed)
        self.lr.valueChanged.connect(self._changed)
        self.weights.editingFinished.connect(self._changed)
        self.dataset.editingFinished.connect(self._changed)

    def _row(self, edit: QLineEdit, button: QPushButton) -> QWidget:
        w = QWidget(self)
        lay = QHBoxLayout(w)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(edit, 1)
        lay.addWidget(button)
        return w

    def _browse_dir(self, edit: QLineEdit) -> None:
        path = QFileDialog.getExistingDirectory(self, "Model directory")
        if path:
            edit.setText(path)
            self.model.setCurrentText(LOCAL_WEIGHTS)
            self._changed()

    def _browse_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Dataset", "", "TSV (*.tsv);;All files (*)")
        if path:
            self.dataset.setText(path)
            self._changed()

    def _changed(self, *_: object) -> None:
        local = self.model.currentText() == LOCAL_WEIGHTS
        self.weights.setEnabled(local)
        par = Parallelism(self.parallelism.currentData())
        self.micro_batches.setEnabled(par.pipelined)
        self.schedule.setEnabled(par.pipelined)
        self.sync_every.setEnabled(par in (Parallelism.DP, Parallelism.HYBRID))
        self.grad_accumulation.setEnabled(par is Parallelism.DP)
        self.dp_mode.setEnabled(par is Parallelism.DP)
        shares = self._base.dp_shares
        self.dp_shares.setEnabled(par is Parallelism.DP)
        self.dp_shares.setText(", ".join(f"{x / sum(shares):.2f}" for x in shares) if shares else "equal")
        self.settings_changed.emit()

    def settings(self) -> RunSettings:
        """The form as :class:`RunSettings` (local weights: the directory is the model)."""
        local = self.model.currentText() == LOCAL_WEIGHTS
        weights = self.weights.text().strip() or None
        # fields the form does not show (seed, tokenizer, timeout, stages) keep their values
        return replace(
            self._base, model=(weights or RunSettings().model) if local else self.model.currentText(),
            parallelism=self.parallelism.currentData(), steps=self.steps.value(),
            batch_size=self.batch_size.value(), seq_len=self.seq_len.value(),
            micro_batches=self.micro_batches.value(), sync_every=self.sync_every.value(),
            lr=self.lr.value() or None, schedule=self.schedule.currentText(),
            dataset=self.dataset.text().strip() or None, weights=weights if local else None,
            device=self.mode.currentData(), checkpoint_every=self.checkpoint_every.value(),
            eval_every=self.eval_every.value(), optimizer=self.optimizer.currentText(),
            activation_checkpointing=self.activation_checkpointing.isChecked(),
            grad_accumulation=self.grad_accumulation.value(), precision=self.precision.currentText(),
            dp_mode=self.dp_mode.currentData())

    def set_settings(self, s: RunSettings) -> None:
        """Show ``s`` (one ``settings_changed`` at the end, not one per widget)."""
        self._base = s
        widgets = [self.model, self.parallelism, self.schedule, self.mode, self.steps, self.batch_size,
                   self.seq_len, self.micro_batches, self.sync_every, self.lr, self.weights, self.dataset,
                   self.checkpoint_every, self.eval_every, self.optimizer, self.activation_checkpointing,
                   self.grad_accumulation, self.precision, self.dp_mode]
        for w in widgets:
            w.blockSignals(True)
        try:
            if s.model in PRESETS:
                self.model.setCurrentText(s.model)
            else:
                self.model.setCurrentText(LOCAL_WEIGHTS)
            self.weights.setText(s.weights or ("" if s.model in PRESETS else s.model))
            self.parallelism.setCurrentIndex(max(0, self.parallelism.findData(s.parallelism.value)))
            self.schedule.setCurrentText(s.schedule.value)
            self.mode.setCurrentIndex(max(0, self.mode.findData(s.device)))
            self.steps.setValue(s.steps)
            self.batch_size.setValue(s.batch_size)
            self.seq_len.setValue(s.seq_len)
            self.micro_batches.setValue(s.micro_batches)
            self.sync_every.setValue(s.sync_every)
            self.checkpoint_every.setValue(s.checkpoint_every)
            self.eval_every.setValue(s.eval_every)
            self.lr.setValue(s.lr or 0.0)
            self.dataset.setText(s.dataset or "")
            self.optimizer.setCurrentText(s.optimizer)
            self.activation_checkpointing.setChecked(s.activation_checkpointing)
            self.grad_accumulation.setValue(s.grad_accumulation)
            self.precision.setCurrentText(s.precision)
            self.dp_mode.setCurrentIndex(max(0, self.dp_mode.findData(s.dp_mode)))
        finally:
            for w in widgets:
                w.blockSignals(False)
        self._changed()

"""Small dialogs: trust a host key (showing its type and fingerprint), add a device by hand."""
from __future__ import annotations

import getpass
from dataclasses import dataclass

from PySide6.QtCore import Qt
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)


class QtTrustDialog(QDialog):
    """Shows a device's host-key type and fingerprint; accepting adds it to EdgeTrain's known_hosts.

    Nothing is trusted without a click on the trust button: Cancel is the default button,
    so Enter or Escape never trusts a key.

    Parameters
    ----------
    name, address
        The device and its ``host:port``.
    fingerprint
        ``SHA256:...`` of the key the device presents now.
    kind
        ``unknown`` (never trusted), ``changed`` (differs from the trusted key: a warning)
        or ``trusted`` (already trusted: shown for information, nothing to accept).
    key_type
        The key's algorithm (``ssh-ed25519``, ...).
    """

    def __init__(self, name: str, address: str, fingerprint: str, kind: str = "unknown",
                 parent: QWidget | None = None, key_type: str = "") -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Host key of {name} (already trusted)" if kind == "trusted"
                            else f"Trust host key of {name}")
        self.fingerprint, self.kind, self.key_type = fingerprint, kind, key_type
        intro = QLabel(self)
        intro.setWordWrap(True)
        if kind == "changed":
            intro.setText(f"<b>The host key of {name} ({address}) has CHANGED.</b><br>"
                          "This may be a different machine answering at that address. Trust the new key "
                          "only if the device was reinstalled and the fingerprint below matches what the "
                          "device itself shows.")
        elif kind == "trusted":
            intro.setText(f"<b>{name}</b> ({address}) presents the host key EdgeTrain already trusts.")
        else:
            intro.setText(f"<b>{name}</b> ({address}) presents a host key that is not in EdgeTrain's "
                          "trusted domain. Compare the key type and fingerprint with the ones on the device "
                          "(<tt>ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub</tt>) before trusting it.")
        self.key_type_label = QLabel(key_type or "unknown key type", self)
        self.fingerprint_label = QLabel(fingerprint, self)
        mono = QFont("monospace")
        mono.setStyleHint(QFont.Monospace)
        for label in (self.key_type_label, self.fingerprint_label):
            label.setFont(mono)
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.fingerprint_label.setStyleSheet("padding: 6px; background: #f1f3f5; border: 1px solid #ced4da;")
        form = QFormLayout()
        form.addRow("Key type", self.key_type_label)
        form.addRow("Fingerprint", self.fingerprint_label)
        buttons = QDialogButtonBox(self)
        self.trust_button = buttons.addButton("Trust this key" if kind != "changed" else "Replace the trusted key",
                                              QDialogButtonBox.AcceptRole)
        self.trust_button.setAutoDefault(False)
        self.trust_button.setVisible(kind != "trusted")
        self.cancel_button = buttons.addButton(QDialogButtonBox.Close if kind == "trusted" else QDialogButtonBox.Cancel)
        self.cancel_button.setDefault(True)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(intro)
        lay.addLayout(form)
        lay.addWidget(buttons)
        self.setMinimumWidth(460)


@dataclass
class ManualDevice:
    """What the user typed into :class:`QtAddDeviceDialog`."""

    name: str
    host: str
    port: int
    user: str
    key: str | None
    python: str


class QtAddDeviceDialog(QDialog):
    """Name, address, SSH port, user, private key and interpreter of a new device.

    No password is asked for: EdgeTrain authenticates with keys only.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Add a device")
        self.name = QLineEdit(self)
        self.host = QLineEdit(self)
        self.host.setPlaceholderText("192.168.1.20 or nano0.local")
        self.port = QSpinBox(self)
        self.port.setRange(1, 65535)
        self.port.setValue(22)
        self.user = QLineEdit(getpass.getuser(), self)
        self.key = QLineEdit(self)
        self.key.setPlaceholderText("~/.ssh/id_ed25519")
        browse = QPushButton("…", self)
        browse.setFixedWidth(28)
        browse.clicked.connect(self._browse)
        key_row = QHBoxLayout()
        key_row.addWidget(self.key, 1)
        key_row.addWidget(browse)
        self.python = QLineEdit("python3", self)
        self.error = QLabel(self)
        self.error.setStyleSheet("color: #c62828;")
        form = QFormLayout()
        form.addRow("Name", self.name)
        form.addRow("Host", self.host)
        form.addRow("SSH port", self.port)
        form.addRow("User", self.user)
        form.addRow("Private key", key_row)
        form.addRow("Python", self.python)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel, self)
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.error)
        lay.addWidget(buttons)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Private key", "", "All files (*)")
        if path:
            self.key.setText(path)

    def value(self) -> ManualDevice:
        return ManualDevice(self.name.text().strip(), self.host.text().strip(), self.port.value(),
                            self.user.text().strip() or getpass.getuser(), self.key.text().strip() or None,
                            self.python.text().strip() or "python3")

    def _accept(self) -> None:
        v = self.value()
        if not v.name or not v.host:
            self.error.setText("Name and host are required.")
            return
        if any(c.isspace() for c in v.name + v.host):
            self.error.setText("Name and host cannot contain spaces.")
            return
        self.accept()

"""The Qt-free state the control panel shows: devices, topology, profiles, settings, plan preview, series."""

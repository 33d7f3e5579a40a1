"""The native shim launcher (launcher.c) and its build."""

// Executes an unreachable instruction: a wasm trap.
int main(void) { __builtin_trap(); }

fn main() -> std::process::ExitCode {
    rollbackd::cli::main()
}

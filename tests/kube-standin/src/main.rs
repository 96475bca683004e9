//! `kube-standin serve --dir DIR`: runs the stand-in API server as a process.

fn main() {
    eprintln!("kube-standin: not implemented yet");
    std::process::exit(2);
}

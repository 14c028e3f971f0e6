//! Prints the OpenAPI document: `cargo run -p corral-controller --example openapi > docs/openapi.json`.

fn main() {
    match corral_controller::openapi().to_pretty_json() {
        Ok(doc) => println!("{doc}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

//! Test helper for `stale_worlds_are_cleaned_up`: builds a world, prints `LEAKED <id>` and
//! aborts, so `Drop` never runs (as if a test process had crashed mid-test).
use aegis_tests::world::World;

fn main() {
    let world = World::builder().pods(1).build();
    println!("LEAKED {}", world.id());
    std::process::abort();
}
